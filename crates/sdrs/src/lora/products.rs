//! The matrix products LoRA parts are rebuilt with (`up · down`, LyCORIS' Tucker rebuild, the
//! Kronecker product), each with the shapes it is given checked first: ranks within
//! [`MAX_LORA_RANK`], sides that match, sizes that fit in 64 bits. Nothing is allocated before
//! the checks pass.

use candle_core::Tensor;

use crate::limits::{exceeded, MAX_LORA_RANK};
use crate::{Error, Result};

fn invalid(message: String) -> Error {
    Error::InvalidRequest(message)
}

/// The product of `sizes`, or `None` when it overflows.
pub(crate) fn product_of(sizes: &[usize]) -> Option<usize> {
    sizes.iter().try_fold(1usize, |a, &b| a.checked_mul(b))
}

/// `(rows, columns)` of `t` as a matrix of `t.dim(0)` rows (A1111's `reshape(size(0), -1)`),
/// from its shape alone.
fn matrix_dims(t: &Tensor) -> Result<(usize, usize)> {
    let dims = t.dims();
    let first = dims.first().copied().unwrap_or(1);
    let rest = product_of(dims.get(1..).unwrap_or(&[]))
        .ok_or_else(|| invalid(format!("a part of shape {dims:?} has too many values")))?;
    Ok((first, rest))
}

/// `t` as a matrix of `t.dim(0)` rows.
pub(crate) fn rows(t: &Tensor) -> Result<Tensor> {
    Ok(t.reshape(matrix_dims(t)?)?)
}

/// `r`, the rank `what` gives, when it is within [`MAX_LORA_RANK`] and not 0.
fn rank(what: &str, r: usize) -> Result<usize> {
    if r == 0 {
        return Err(invalid(format!("{what} gives a rank of 0")));
    }
    if r > MAX_LORA_RANK {
        return Err(exceeded(
            format!("the rank {what} gives"),
            r,
            "MAX_LORA_RANK",
            MAX_LORA_RANK,
        ));
    }
    Ok(r)
}

/// The shape `[out, in, kh, kw]` of [`cp`]`(t, wa, wb)`, checked from the shapes alone: the
/// core is 4-D, its sides are ranks that match the factors' rows, and the size fits in memory.
pub(crate) fn cp_shape(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<[usize; 4]> {
    let &[r1, r2, kh, kw] = t.dims() else {
        return Err(invalid(format!(
            "a Tucker core is {}-D {:?}, not 4-D",
            t.rank(),
            t.dims()
        )));
    };
    let ((a_rows, out), (b_rows, inp)) = (matrix_dims(wa)?, matrix_dims(wb)?);
    if a_rows != r1 || b_rows != r2 {
        return Err(invalid(format!(
            "a Tucker core {:?} does not fit its factors {:?} and {:?}",
            t.dims(),
            wa.dims(),
            wb.dims()
        )));
    }
    rank("a Tucker core", r1)?;
    rank("a Tucker core", r2)?;
    if product_of(&[out, inp, kh, kw]).is_none() {
        return Err(invalid(format!(
            "a Tucker core {:?} and its factors {:?} and {:?} make too many values",
            t.dims(),
            wa.dims(),
            wb.dims()
        )));
    }
    Ok([out, inp, kh, kw])
}

/// LyCORIS' CP rebuild `einsum('i j k l, i r, j p -> r p k l', t, wa, wb)` as two matrix
/// products, the one that leaves the smaller intermediate first (ranks are at most
/// [`MAX_LORA_RANK`], so neither is much larger than the result).
pub(crate) fn cp(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<Tensor> {
    let [out, inp, kh, kw] = cp_shape(t, wa, wb)?;
    let (r1, r2, taps) = (t.dim(0)?, t.dim(1)?, kh * kw);
    let (wa, wb) = (rows(wa)?.t()?.contiguous()?, rows(wb)?.contiguous()?);
    let t = t.reshape((r1, r2, taps))?;
    // [out, taps, inp], by way of [r1·taps, inp] or of [out, r2·taps].
    let y = if r1.saturating_mul(inp) <= out.saturating_mul(r2) {
        let x = t
            .permute((0, 2, 1))?
            .contiguous()?
            .reshape((r1 * taps, r2))?
            .matmul(&wb)?;
        wa.matmul(&x.reshape((r1, taps * inp))?)?
    } else {
        let x = wa.matmul(&t.reshape((r1, r2 * taps))?)?;
        x.reshape((out, r2, taps))?
            .permute((0, 2, 1))?
            .contiguous()?
            .reshape((out * taps, r2))?
            .matmul(&wb)?
    };
    Ok(y.reshape((out, taps, inp))?
        .permute((0, 2, 1))?
        .contiguous()?
        .reshape((out, inp, kh, kw))?)
}

/// The Kronecker product of matrices or of a matrix and a 4-D kernel (A1111's `make_kron`,
/// before its reshape).
pub(crate) fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q) = a.dims2()?;
    match *b.dims() {
        [m, n] => Ok(a
            .reshape((p, 1, q, 1))?
            .broadcast_mul(&b.reshape((1, m, 1, n))?)?
            .reshape((p * m, q * n))?),
        [m, n, kh, kw] => Ok(a
            .reshape((p, 1, q, 1, 1))?
            .broadcast_mul(&b.reshape((1, m, 1, n, kh * kw))?)?
            .reshape((p * m, q * n, kh, kw))?),
        _ => Err(invalid(format!(
            "a LoKr factor is {}-D {:?}, neither a matrix nor a kernel",
            b.rank(),
            b.dims()
        ))),
    }
}

/// `(rows, columns)` of `up · down` (as matrices), checked from the shapes alone: the inner
/// sides match and are a rank.
pub(crate) fn product_dims(up: &Tensor, down: &Tensor, what: &str) -> Result<(usize, usize)> {
    let ((out, r_up), (r, inp)) = (matrix_dims(up)?, matrix_dims(down)?);
    if r_up != r {
        return Err(invalid(format!(
            "{what}: {:?} and {:?} do not multiply",
            up.dims(),
            down.dims()
        )));
    }
    rank(what, r)?;
    Ok((out, inp))
}

/// `up · down`, with `dyn` keeping the first ranks only (shapes checked by
/// [`product_dims`] first).
pub(crate) fn product(
    up: &Tensor,
    down: &Tensor,
    dyn_dim: Option<usize>,
    what: &str,
) -> Result<Tensor> {
    product_dims(up, down, what)?;
    let (mut up, mut down) = (rows(up)?, rows(down)?);
    if let Some(d) = dyn_dim.filter(|&d| d < down.dim(0).unwrap_or(0)) {
        up = up.narrow(1, 0, d)?;
        down = down.narrow(0, 0, d)?;
    }
    Ok(up.contiguous()?.matmul(&down.contiguous()?)?)
}

/// The largest |value| of `t`.
#[cfg(test)]
fn max_abs(t: &Tensor) -> f32 {
    use candle_core::D;
    t.abs()
        .and_then(|a| a.flatten_all())
        .and_then(|a| a.max(D::Minus1))
        .and_then(|m| m.to_scalar::<f32>())
        .unwrap_or(f32::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn both_orders_of_the_tucker_rebuild_equal_the_einsum() {
        // einsum('i j k l, i r, j p -> r p k l'), summed term by term.
        let naive = |t: &[f32],
                     (r1, r2, taps): (usize, usize, usize),
                     wa: &[f32],
                     out: usize,
                     wb: &[f32],
                     inp: usize| {
            let mut y = vec![0.0f32; out * inp * taps];
            for (i, j, k, r, p) in (0..r1).flat_map(|i| {
                (0..r2).flat_map(move |j| {
                    (0..taps).flat_map(move |k| {
                        (0..out).flat_map(move |r| (0..inp).map(move |p| (i, j, k, r, p)))
                    })
                })
            }) {
                y[(r * inp + p) * taps + k] +=
                    t[(i * r2 + j) * taps + k] * wa[i * out + r] * wb[j * inp + p];
            }
            y
        };
        let values = |n: usize| (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        // (r1, r2, out, inp): the first contracts wb first (r1·inp ≤ out·r2), the second wa.
        for (r1, r2, out, inp) in [(2, 3, 5, 4), (5, 2, 3, 6)] {
            let (tv, wav, wbv): (Vec<f32>, Vec<f32>, Vec<f32>) =
                (values(r1 * r2 * 6), values(r1 * out), values(r2 * inp));
            let y = cp(
                &t(&tv, &[r1, r2, 2, 3]),
                &t(&wav, &[r1, out]),
                &t(&wbv, &[r2, inp]),
            )
            .unwrap();
            assert_eq!(y.dims(), &[out, inp, 2, 3]);
            let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = naive(&tv, (r1, r2, 6), &wav, out, &wbv, inp);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "{r1} {r2} {out} {inp}: off by {worst}");
        }
    }

    #[test]
    fn a_tucker_core_of_identity_taps_is_the_plain_product() {
        // With t[:, :, k, l] = I for every tap, each tap of the result is waᵀ·wb.
        let r = 2;
        let mut core = vec![0.0f32; r * r * 9];
        for i in 0..r {
            for k in 0..9 {
                core[(i * r + i) * 9 + k] = 1.0;
            }
        }
        let wa = t(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let wb = t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]);
        let y = cp(&t(&core, &[r, r, 3, 3]), &wa, &wb).unwrap();
        assert_eq!(y.dims(), &[3, 2, 3, 3]);
        let tap = y
            .narrow(2, 1, 1)
            .unwrap()
            .narrow(3, 2, 1)
            .unwrap()
            .squeeze(3)
            .unwrap()
            .squeeze(2)
            .unwrap();
        let want = wa.t().unwrap().matmul(&wb).unwrap();
        assert_eq!(max_abs(&(tap - want).unwrap()), 0.0);
    }
}
