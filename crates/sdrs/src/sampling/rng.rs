//! Seeded noise bit-identical to torch's CPU generator: `torch.Generator().manual_seed(seed)`
//! followed by `torch.randn(shape, generator=g)` in float32, call after call.
//!
//! torch draws a float32 `randn` of n values in one of two ways:
//! - n >= 16: n uniforms `(u32 & 0xFFFFFF) · 2^-24` first, then Box–Muller in place over blocks
//!   of 16 (pairs j, j+8); when n % 16 != 0, 16 fresh uniforms overwrite the last 16 slots and
//!   that block is transformed again. The float math comes in two variants (see
//!   [`NormalVariant`]).
//! - n < 16: one value at a time from a double-precision Box–Muller on 53-bit uniforms, which
//!   yields two values and keeps the second in the generator for the next call.

mod cephes;
mod mt19937;
mod philox;

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};

use super::NoiseSource;
use crate::{Error, Result};
use mt19937::Mt19937;
pub use philox::Philox;

/// Where an image's noise comes from, by A1111's names for its `randn_source` setting.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum RandnSource {
    /// torch's CPU generator (MT19937): A1111's "CPU", and sdrs' CLI default.
    #[default]
    #[serde(rename = "CPU", alias = "cpu")]
    Cpu,
    /// torch's CUDA generator (Philox), on any device: A1111's "NV", and what its default
    /// "GPU" gives on an NVIDIA card, so an A1111 infotext without an `RNG` key means it.
    #[serde(rename = "NV", alias = "nv", alias = "GPU", alias = "gpu")]
    Nv,
}

impl FromStr for RandnSource {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "nv" | "gpu" => Ok(Self::Nv),
            _ => Err(Error::InvalidRequest(format!(
                "unknown random number source {s:?}; valid: CPU, NV (GPU reads as NV)"
            ))),
        }
    }
}

impl fmt::Display for RandnSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "CPU",
            Self::Nv => "NV",
        })
    }
}

/// One image's generator, from the source its request names: every draw (initial noise,
/// posterior sample, sampler noise) comes from it in turn.
#[derive(Clone)]
pub enum ImageNoise {
    /// torch's CPU generator.
    Cpu(TorchRng),
    /// torch's CUDA generator.
    Nv(Philox),
}

impl ImageNoise {
    /// The generator for `seed` from `source` (`variant` is the CPU generator's float math).
    pub fn new(seed: u64, source: RandnSource, variant: NormalVariant) -> Self {
        match source {
            RandnSource::Cpu => Self::Cpu(TorchRng::new(seed, variant)),
            RandnSource::Nv => Self::Nv(Philox::new(seed)),
        }
    }
}

impl NoiseSource for ImageNoise {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        match self {
            Self::Cpu(rng) => rng.sample(shape, device),
            Self::Nv(philox) => {
                let values = philox.randn(shape.iter().product());
                Ok(Tensor::from_vec(values, shape, device)?)
            }
        }
    }
}

/// Which float math torch's n >= 16 `randn` kernel runs; they differ in the last bit of some values.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum NormalVariant {
    /// libm `logf`/`cosf`/`sinf`: torch with CPU capability "default" (no AVX2). Like torch, it
    /// calls the platform's libm, so it is bit-equal where both use the same one (glibc here).
    Scalar,
    /// avx_mathfun's Cephes polynomials with FMA: torch on x86-64 with AVX2 or AVX-512.
    #[default]
    Avx2,
}

impl FromStr for NormalVariant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Ok(Self::Scalar),
            "avx2" => Ok(Self::Avx2),
            _ => Err(Error::InvalidRequest(format!(
                "unknown normal variant {s:?}; valid: scalar, avx2"
            ))),
        }
    }
}

impl fmt::Display for NormalVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
        })
    }
}

/// torch's CPU generator: MT19937 state plus the cached second value of a Box–Muller pair.
#[derive(Clone)]
pub struct TorchGenerator {
    mt: Mt19937,
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// A generator as after `torch.Generator().manual_seed(seed)`; only the low 32 bits count.
    pub fn new(seed: u64) -> Self {
        Self {
            mt: Mt19937::new(seed),
            next_double_normal: None,
        }
    }

    /// The next raw 32-bit MT19937 output.
    pub fn next_u32(&mut self) -> u32 {
        self.mt.next_u32()
    }

    /// `n` standard-normal values, equal bit for bit to `torch.randn(n, generator=g)`.
    pub fn randn(&mut self, n: usize, variant: NormalVariant) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            normal_fill_16(block, variant);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            normal_fill_16(tail, variant);
        }
        data
    }

    /// `at::uniform_real_distribution<float>(0, 1)`: 24 random bits.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `at::uniform_real_distribution<double>(0, 1)`: 53 bits of `random64()`, whose first
    /// 32-bit draw is the high half.
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        let bits = ((hi << 32) | lo) & ((1u64 << 53) - 1);
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `at::normal_distribution<double>(0, 1)`, which returns a cached value when it has one.
    fn normal_f64(&mut self) -> f64 {
        let value = match self.next_double_normal.take() {
            Some(cached) => cached,
            None => {
                let u1 = self.uniform_f64();
                let u2 = self.uniform_f64();
                let radius = (-2.0 * (-u2).ln_1p()).sqrt();
                let theta = 2.0 * PI * u1;
                self.next_double_normal = Some(radius * theta.sin());
                radius * theta.cos()
            }
        };
        // torch applies `value * std + mean`; with std 1 and mean 0 that only turns -0 into +0.
        value * 1.0 + 0.0
    }
}

/// torch's `2π` for the AVX2 kernel: the double rounded to float, as `_mm256_set1_ps` receives it.
const TWO_PI_F32: f32 = (2.0 * PI) as f32;

/// Box–Muller over one block of 16 uniforms, in place: pairs (j, j+8) become (r·cos θ, r·sin θ).
fn normal_fill_16(block: &mut [f32], variant: NormalVariant) {
    for j in 0..8 {
        // [0, 1) -> (0, 1] so the logarithm is finite.
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let (radius, sin, cos) = match variant {
            NormalVariant::Scalar => {
                let radius = (-2.0 * u1.ln()).sqrt();
                // The scalar kernel forms θ in double (`2.0f * pi<double> * u2`) and rounds it.
                let theta = (2.0 * PI * f64::from(u2)) as f32;
                (radius, theta.sin(), theta.cos())
            }
            NormalVariant::Avx2 => {
                let radius = (-2.0 * cephes::log(u1)).sqrt();
                let (sin, cos) = cephes::sincos(TWO_PI_F32 * u2);
                (radius, sin, cos)
            }
        };
        // Both kernels finish with `fma(n, std, mean)`; with std 1 and mean 0 that is `n + 0`.
        block[j] = radius * cos + 0.0;
        block[j + 8] = radius * sin + 0.0;
    }
}

/// A [`NoiseSource`] drawing from one [`TorchGenerator`], as `torch.randn(shape, generator=g)`.
#[derive(Clone)]
pub struct TorchRng {
    generator: TorchGenerator,
    variant: NormalVariant,
}

impl TorchRng {
    /// A noise source seeded like `torch.Generator().manual_seed(seed)`.
    pub fn new(seed: u64, variant: NormalVariant) -> Self {
        Self {
            generator: TorchGenerator::new(seed),
            variant,
        }
    }
}

impl NoiseSource for TorchRng {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let values = self.generator.randn(n, self.variant);
        Ok(Tensor::from_vec(values, shape, device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_parses_and_prints() {
        for v in [NormalVariant::Scalar, NormalVariant::Avx2] {
            assert_eq!(v.to_string().parse::<NormalVariant>().ok(), Some(v));
        }
        assert_eq!(
            "AVX2".parse::<NormalVariant>().ok(),
            Some(NormalVariant::Avx2)
        );
        assert!("sse".parse::<NormalVariant>().is_err());
        assert_eq!(NormalVariant::default(), NormalVariant::Avx2);
    }

    #[test]
    fn uniforms_use_24_and_53_bits() {
        let mut a = TorchGenerator::new(7);
        let mut b = TorchGenerator::new(7);
        let u = a.uniform_f32();
        assert_eq!(u, (b.next_u32() & 0xff_ffff) as f32 / 16_777_216.0);
        let d = a.uniform_f64();
        let (hi, lo) = (b.next_u32() as u64, b.next_u32() as u64);
        assert_eq!(
            d,
            ((hi & 0x1f_ffff) << 32 | lo) as f64 / 9_007_199_254_740_992.0
        );
    }

    #[test]
    fn small_draws_use_the_cached_second_value() {
        let mut g = TorchGenerator::new(3);
        let pair = g.randn(2, NormalVariant::Avx2);
        let mut h = TorchGenerator::new(3);
        let first = h.randn(1, NormalVariant::Avx2);
        let second = h.randn(1, NormalVariant::Avx2);
        assert_eq!(pair, [first[0], second[0]]);
        // Only 4 words were drawn for the pair.
        let mut fresh = TorchGenerator::new(3);
        (0..4).for_each(|_| {
            fresh.next_u32();
        });
        assert_eq!(h.next_u32(), fresh.next_u32());
    }

    #[test]
    fn sample_has_the_requested_shape() -> Result<()> {
        let mut rng = TorchRng::new(0, NormalVariant::Avx2);
        let t = rng.sample(&[1, 4, 8, 8], &Device::Cpu)?;
        assert_eq!(t.dims(), [1, 4, 8, 8]);
        let flat = TorchGenerator::new(0).randn(256, NormalVariant::Avx2);
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, flat);
        Ok(())
    }
}
