//! One lane of `log256_ps` and `sincos256_ps` from torch's `ATen/native/cpu/avx_mathfun.h`
//! (G. Garberoglio's AVX port of J. Pommier's Cephes-based sse_mathfun; zlib licence).
//!
//! torch's AVX2 normal kernel runs these float32 polynomials, not libm. Its wheels are built with
//! GCC, which contracts each multiply feeding an add into a fused multiply-add; the `mul_add`
//! calls below sit exactly where the shipped binary has them, which is what makes the results
//! equal bit for bit (plain multiply-then-add changes the last bit of about 1 value in 100).

// The constants are copied digit for digit from the C header and, like its `_PS256_CONST`
// tables, rounded from double to float; shortening them would risk a different float.
#![allow(clippy::excessive_precision)]

const SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
const LOG_P: [f32; 9] = [
    7.0376836292E-2_f64 as f32,
    -1.1514610310E-1_f64 as f32,
    1.1676998740E-1_f64 as f32,
    -1.2420140846E-1_f64 as f32,
    1.4249322787E-1_f64 as f32,
    -1.6668057665E-1_f64 as f32,
    2.0000714765E-1_f64 as f32,
    -2.4999993993E-1_f64 as f32,
    3.3333331174E-1_f64 as f32,
];
/// ln 2 split in two so that `e * ln2` keeps its precision.
const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
const LOG_Q2: f32 = 0.693359375;

/// Natural logarithm of a positive float, as `log256_ps` computes it.
pub(crate) fn log(x: f32) -> f32 {
    // Denormals are clamped to the smallest normal, as the vector code does.
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let exponent = (bits >> 23) as i32 - 0x7f;
    // Mantissa scaled into [0.5, 1).
    let mut m = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let mut e = exponent as f32 + 1.0;
    let below = m < SQRT_HALF;
    let tmp = if below { m } else { 0.0 };
    m -= 1.0;
    if below {
        e -= 1.0;
    }
    m += tmp;

    let z = m * m;
    let mut y = LOG_P[0];
    for &p in &LOG_P[1..] {
        y = y.mul_add(m, p);
    }
    y *= m;
    y = y.mul_add(z, e * LOG_Q1);
    y = z.mul_add(-0.5, y);
    e.mul_add(LOG_Q2, m + y)
}

const FOUR_OVER_PI: f32 = 1.27323954473516_f64 as f32;
/// -π/4 split in three parts for the "extended precision modular arithmetic" reduction.
const MINUS_DP: [f32; 3] = [
    -0.78515625,
    -2.4187564849853515625e-4,
    -3.77489497744594108e-8_f64 as f32,
];
const SIN_P: [f32; 3] = [
    -1.9515295891E-4_f64 as f32,
    8.3321608736E-3_f64 as f32,
    -1.6666654611E-1_f64 as f32,
];
const COS_P: [f32; 3] = [
    2.443315711809948E-5_f64 as f32,
    -1.388731625493765E-3_f64 as f32,
    4.166664568298827E-2_f64 as f32,
];

/// `(sin x, cos x)` as `sincos256_ps` computes them.
pub(crate) fn sincos(x: f32) -> (f32, f32) {
    const SIGN: u32 = 0x8000_0000;
    let mut sign_sin = x.to_bits() & SIGN;
    let mut x = x.abs();

    // Octant j (made even), as cvttps truncates.
    let j = (((x * FOUR_OVER_PI) as i32) + 1) & !1;
    let y = j as f32;
    sign_sin ^= ((j & 4) as u32) << 29;
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let use_sin_poly_for_sin = j & 2 == 0;

    for dp in MINUS_DP {
        x = y.mul_add(dp, x);
    }
    let z = x * x;

    // cos on [0, π/4]; the last multiply by z fuses with the subtraction of z/2.
    let mut c = COS_P[0].mul_add(z, COS_P[1]);
    c = c.mul_add(z, COS_P[2]);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;

    // sin on [0, π/4].
    let mut s = SIN_P[0].mul_add(z, SIN_P[1]);
    s = s.mul_add(z, SIN_P[2]);
    s *= z;
    s = s.mul_add(x, x);

    let (sin, cos) = if use_sin_poly_for_sin { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_close_to_libm() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            let err = (log(x) - x.ln()).abs();
            assert!(err <= 2.0 * f32::EPSILON * x.ln().abs().max(1.0), "x={x}");
        }
        assert_eq!(log(1.0), 0.0);
    }

    #[test]
    fn sincos_is_close_to_libm() {
        for i in 0..=1000 {
            let x = i as f32 * (std::f32::consts::TAU / 1000.0);
            let (s, c) = sincos(x);
            assert!((s - x.sin()).abs() <= 2.0 * f32::EPSILON, "sin x={x}");
            assert!((c - x.cos()).abs() <= 2.0 * f32::EPSILON, "cos x={x}");
        }
    }
}
