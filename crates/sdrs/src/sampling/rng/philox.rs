//! torch's CUDA `randn` reproduced on any device (A1111's "NV" source, `rng_philox.py`):
//! Philox4x32-10 keyed by the seed, one counter per value, Box–Muller on the first two words.
//!
//! A call draws value `i` from the counter `[offset, 0, i, 0]` and the key `[seed low 32 bits,
//! seed high 32 bits]`, then moves the offset on by one, so the k-th call of a generator (its
//! initial noise, then each sampler step's) starts from the same state as torch's k-th CUDA
//! `randn` after `manual_seed`. Of the four output words the first is the radius's uniform and
//! the second the angle's; the other two are dropped.

/// Philox's round multipliers.
const M: [u32; 2] = [0xD251_1F53, 0xCD9E_8D57];
/// Philox's key increments (the golden ratio and √3 − 1, in 32 bits).
const W: [u32; 2] = [0x9E37_79B9, 0xBB67_AE85];
/// 2⁻³² as the float32 A1111 writes it (2.3283064e-10), and that times 2π in float32.
const TWO_POW32_INV: f32 = 2.328_306_4e-10;
const TWO_POW32_INV_2PI: f32 = 2.328_306_4e-10 * 6.283_185_5;

/// Ten Philox4x32 rounds of `counter` under `key`.
fn philox4x32_10(mut c: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        let v1 = u64::from(c[0]) * u64::from(M[0]);
        let v2 = u64::from(c[2]) * u64::from(M[1]);
        c = [
            (v2 >> 32) as u32 ^ c[1] ^ key[0],
            v2 as u32,
            (v1 >> 32) as u32 ^ c[3] ^ key[1],
            v1 as u32,
        ];
        if round < 9 {
            key = [key[0].wrapping_add(W[0]), key[1].wrapping_add(W[1])];
        }
    }
    c
}

/// The first value of a Box–Muller pair from two 32-bit words. The words become uniforms in
/// (0, 1] and (0, 2π] with the float32 constants, and the rest is double precision rounded
/// to float32 once at the end: numpy promotes `uint32 · float32` to float64, so A1111's code
/// computes exactly this.
fn box_muller(x: u32, y: u32) -> f32 {
    let (inv, inv_2pi) = (f64::from(TWO_POW32_INV), f64::from(TWO_POW32_INV_2PI));
    // `two_pow32_inv / 2` stays a float32 in numpy before it is added.
    let u = f64::from(x) * inv + f64::from(TWO_POW32_INV / 2.0);
    let v = f64::from(y) * inv_2pi + f64::from(TWO_POW32_INV_2PI / 2.0);
    ((-2.0 * u.ln()).sqrt() * v.sin()) as f32
}

/// A generator as after `torch.manual_seed(seed)` on a CUDA device, for `randn` calls.
#[derive(Debug, Clone)]
pub struct Philox {
    key: [u32; 2],
    offset: u32,
}

impl Philox {
    /// A generator for `seed` (all 64 bits count).
    pub fn new(seed: u64) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            offset: 0,
        }
    }

    /// `n` standard normal values: the next `torch.randn(n, device="cuda")`. Values past 2³²
    /// in one call would repeat (the counter's index word wraps, as in A1111's code); no
    /// latent comes near that.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let offset = self.offset;
        self.offset = self.offset.wrapping_add(1);
        (0..n)
            .map(|i| {
                let out = philox4x32_10([offset, 0, i as u32, 0], self.key);
                box_muller(out[0], out[1])
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in the docstring of A1111's `rng_philox.py`, which is what
    /// `torch.manual_seed(0); torch.randn((3, 4), device="cuda")` prints. A1111's float32
    /// constants (2π/2³² rounded up by about 3·10⁻⁸ relatively) leave its values, and so
    /// these, up to 3·10⁻⁷ from CUDA's; the fixture test holds them bit-equal to A1111's.
    #[test]
    fn seed_zero_gives_torch_cudas_first_values() {
        let want = [
            -0.924_662_59,
            -0.425_344_15,
            -2.643_845_7,
            0.145_183_88,
            -0.120_866_47,
            -0.579_725_64,
            -0.622_851_22,
            -0.328_387_09,
            -1.074_542_31,
            -0.363_144_07,
            -1.671_050_67,
            2.265_504_97,
        ];
        let got = Philox::new(0).randn(12);
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 3e-7, "{got:?}");
        }
    }

    #[test]
    fn each_call_moves_the_offset_and_the_high_seed_bits_count() {
        let mut g = Philox::new(5);
        let first = g.randn(8);
        let second = g.randn(8);
        assert_ne!(first, second);
        assert_eq!(Philox::new(5).randn(8), first);
        assert_ne!(Philox::new(5 + (1 << 32)).randn(8), first);
        // Value i depends on i alone, not on how many are drawn.
        assert_eq!(Philox::new(5).randn(3), first[..3]);
    }
}
