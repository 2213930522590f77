//! Vectorised element-wise math for the kernels: exp, softmax rows, SiLU.

/// exp(x) for x in [-87.3, 88] to about 2 ulp (Cephes' expf: range reduction by ln 2, then
/// a degree-6 polynomial); inputs outside are clamped. Branch-free so it vectorises.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.0);
    // Adding and removing 1.5·2²³ rounds to nearest in one vectorisable step (`round` is a
    // libm call, which kept this loop scalar).
    const ROUNDER: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUNDER) - ROUNDER;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2ⁿ from the bits: n + 127 sits in the low mantissa bits of n + 127 + 1.5·2²³, and a
    // float-to-int cast would be scalarised for its saturation checks.
    p * f32::from_bits((n + (ROUNDER + 127.0)).to_bits() << 23)
}

/// Lanes for reductions: separate partial results let the compiler vectorise loops that a
/// single running sum or max would chain element by element.
const LANES: usize = 16;

#[inline(always)]
fn softmax_row_body(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, v) in sums.iter_mut().zip(chunk) {
            *v = exp_approx(*v - max);
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_approx(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[inline(always)]
fn sum_body(xs: &[f32], center: f64) -> (f64, f64) {
    let mut sums = [0f64; LANES];
    let mut squares = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for ((s, q), &v) in sums.iter_mut().zip(&mut squares).zip(chunk) {
            let d = v as f64 - center;
            *s += d;
            *q += d * d;
        }
    }
    let (mut s, mut q) = (sums.iter().sum::<f64>(), squares.iter().sum::<f64>());
    for &v in chunks.remainder() {
        let d = v as f64 - center;
        s += d;
        q += d * d;
    }
    (s, q)
}

#[inline(always)]
fn silu_body(xs: &mut [f32]) {
    for v in xs.iter_mut() {
        *v /= 1.0 + exp_approx(-*v);
    }
}

/// erfc(z) for z ≥ 0, to a relative 1.2e-7 (Numerical Recipes' `erfcc`: a Chebyshev fit in
/// t = 1/(1 + z/2) inside an exp), branch-free so it vectorises.
#[inline(always)]
fn erfc_nonnegative(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = 0.170_872_77_f32;
    let p = p * t - 0.822_152_23;
    let p = p * t + 1.488_515_9;
    let p = p * t - 1.135_204;
    let p = p * t + 0.278_868_07;
    let p = p * t - 0.186_288_06;
    let p = p * t + 0.096_784_18;
    let p = p * t + 0.374_091_96;
    let p = p * t + 1.000_023_7;
    let p = p * t - 1.265_512_2;
    t * exp_approx(p - z * z)
}

/// GELU with erf: x·Φ(x) = x·erfc(−x/√2)/2.
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    let z = -x * std::f32::consts::FRAC_1_SQRT_2;
    let tail = erfc_nonnegative(z.abs());
    let erfc = if z >= 0.0 { tail } else { 2.0 - tail };
    0.5 * x * erfc
}

#[inline(always)]
fn gated_gelu_body(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a * gelu_erf(b);
    }
}

#[inline(always)]
fn scale_shift_body(xs: &mut [f32], scale: f32, shift: f32) {
    for v in xs.iter_mut() {
        *v = *v * scale + shift;
    }
}

macro_rules! dispatched {
    ($name:ident, $body:ident, $doc:literal, ($($arg:ident: $ty:ty),*)) => {
        #[doc = $doc]
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` was compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatched!(softmax_row, softmax_row_body, "Softmax of one row, in place.", (row: &mut [f32]));
/// Σ(x − center) and Σ(x − center)², accumulated in f64.
pub fn centered_sums(xs: &[f32], center: f64) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide(xs: &[f32], center: f64) -> (f64, f64) {
            sum_body(xs, center)
        }
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `wide` was compiled for.
            return unsafe { wide(xs, center) };
        }
    }
    sum_body(xs, center)
}

dispatched!(silu, silu_body, "x·sigmoid(x), in place.", (xs: &mut [f32]));
dispatched!(gated_gelu, gated_gelu_body, "out = a·gelu(b), GELU with erf.", (a: &[f32], b: &[f32], out: &mut [f32]));
dispatched!(scale_shift, scale_shift_body, "x·scale + shift, in place.", (xs: &mut [f32], scale: f32, shift: f32));

#[cfg(test)]
mod tests {
    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f32;
        for i in -8730..8800 {
            let x = i as f32 * 0.01;
            let rel = ((super::exp_approx(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn gelu_matches_x_times_the_normal_cdf() {
        // x·Φ(x), Φ from tables (to 16 digits).
        let cases: [(f64, f64); 7] = [
            (0.0, 0.0),
            (1.0, 0.841_344_746_068_542_9),
            (-1.0, -0.158_655_253_931_457_05),
            (3.0, 3.0 * 0.998_650_101_968_369_9),
            (-3.0, -3.0 * 0.001_349_898_031_630_094_6),
            (0.5, 0.5 * 0.691_462_461_274_013_1),
            (-6.0, -6.0 * 9.865_876_450_376_98e-10),
        ];
        for (x, want) in cases {
            let got = super::gelu_erf(x as f32) as f64;
            let tolerance = 1e-6 * want.abs().max(1e-3 * x.abs());
            assert!(
                (got - want).abs() <= tolerance,
                "gelu({x}) = {got}, want {want}"
            );
        }
    }
}
