//! ΔW of one layer from its LoRA parts, by the formulas of A1111's built-in Lora extension
//! (`network_lora.py`, `network_hada.py`, `network_lokr.py`, `network_full.py`,
//! `lyco_helpers.py`), which LyCORIS defines: ΔW · scale, where scale is the file's `scale`,
//! else alpha / rank, else 1.

use candle_core::Tensor;

use super::file::{Part, Parts};
use crate::{Error, Result};

/// What kind of layer change the parts make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `up · down` (kohya LoRA and LoCon, PEFT, diffusers), optionally through a Tucker core.
    Lora,
    /// LoHa: `(w1a · w1b) ⊙ (w2a · w2b)`.
    Hada,
    /// LoKr: `w1 ⊗ w2`, each factor whole or a product.
    Lokr,
    /// The whole difference, stored.
    Full,
}

/// The kind the parts make up, or `None` when they are incomplete.
pub(crate) fn kind(parts: &Parts) -> Option<Kind> {
    let has = |p| parts.contains_key(&p);
    if has(Part::Up) && has(Part::Down) {
        Some(Kind::Lora)
    } else if [Part::HadaW1A, Part::HadaW1B, Part::HadaW2A, Part::HadaW2B]
        .into_iter()
        .all(has)
    {
        Some(Kind::Hada)
    } else if (has(Part::LokrW1) || has(Part::LokrW1A) && has(Part::LokrW1B))
        && (has(Part::LokrW2) || has(Part::LokrW2A) && has(Part::LokrW2B))
    {
        Some(Kind::Lokr)
    } else if has(Part::Diff) || has(Part::DiffB) {
        Some(Kind::Full)
    } else {
        None
    }
}

fn part(parts: &Parts, p: Part) -> Result<&Tensor> {
    parts
        .get(&p)
        .ok_or_else(|| Error::InvalidRequest(format!("a layer lacks its {p:?} part")))
}

/// `t` as a matrix of `t.dim(0)` rows (A1111's `reshape(size(0), -1)`).
fn rows(t: &Tensor) -> Result<Tensor> {
    let first = t.dims().first().copied().unwrap_or(1);
    Ok(t.reshape((first, t.elem_count() / first.max(1)))?)
}

/// A scalar part (`alpha`, `scale`) as f64.
fn scalar(parts: &Parts, p: Part) -> Result<Option<f64>> {
    parts
        .get(&p)
        .map(|t| {
            if t.elem_count() != 1 {
                return Err(Error::InvalidRequest(format!(
                    "{p:?} holds {} values, not one",
                    t.elem_count()
                )));
            }
            Ok(t.flatten_all()?.to_vec1::<f32>()?[0] as f64)
        })
        .transpose()
}

/// LyCORIS' CP rebuild `einsum('i j k l, i r, j p -> r p k l', t, wa, wb)`: for each kernel
/// tap, `waᵀ · t[:, :, k, l] · wb`.
fn cp(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let wa = rows(wa)?;
    let wb = rows(wb)?;
    if wa.dim(0)? != r1 || wb.dim(0)? != r2 {
        return Err(Error::InvalidRequest(format!(
            "a Tucker core {:?} does not fit its factors {:?} and {:?}",
            t.dims(),
            wa.dims(),
            wb.dims()
        )));
    }
    let taps = t.permute((2, 3, 0, 1))?.reshape((kh * kw, r1, r2))?;
    let (out, inp) = (wa.dim(1)?, wb.dim(1)?);
    let left = wa
        .t()?
        .contiguous()?
        .unsqueeze(0)?
        .broadcast_as((kh * kw, out, r1))?;
    let right = wb.unsqueeze(0)?.broadcast_as((kh * kw, r2, inp))?;
    let y = left
        .contiguous()?
        .matmul(&taps.contiguous()?)?
        .matmul(&right.contiguous()?)?;
    Ok(y.reshape((kh, kw, out, inp))?
        .permute((2, 3, 0, 1))?
        .contiguous()?)
}

/// The Kronecker product of matrices or of a matrix and a 4-D kernel (A1111's `make_kron`,
/// before its reshape).
fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
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
        _ => Err(Error::InvalidRequest(format!(
            "a LoKr factor of shape {:?}",
            b.dims()
        ))),
    }
}

/// The number of values `up · down` has, from shapes alone (checked before multiplying).
fn product_len(a: &Tensor, b: &Tensor) -> usize {
    let rows = a.dims().first().copied().unwrap_or(1);
    let cols = b.elem_count() / b.dims().first().copied().unwrap_or(1).max(1);
    rows.saturating_mul(cols)
}

/// `up · down`, with `dyn` keeping the first ranks only.
fn product(up: &Tensor, down: &Tensor, dyn_dim: Option<usize>) -> Result<Tensor> {
    let (mut up, mut down) = (rows(up)?, rows(down)?);
    if up.dim(1)? != down.dim(0)? {
        return Err(Error::InvalidRequest(format!(
            "up {:?} and down {:?} do not multiply",
            up.dims(),
            down.dims()
        )));
    }
    if let Some(d) = dyn_dim.filter(|&d| d < down.dim(0).unwrap_or(0)) {
        up = up.narrow(1, 0, d)?;
        down = down.narrow(0, 0, d)?;
    }
    Ok(up.contiguous()?.matmul(&down.contiguous()?)?)
}

/// A plain LoRA layer's change as its two factors: `(up [out, r], down [r, in·k·k], scale)`
/// with `dyn` applied, so that ΔW = scale · up · down can be added by one matrix product;
/// `None` for every other kind (and LoRA through a Tucker core). Sizes are checked as in
/// [`delta`].
pub(crate) fn factors(
    parts: &Parts,
    target: &[usize],
    dyn_dim: Option<usize>,
) -> Result<Option<(Tensor, Tensor, f64)>> {
    if kind(parts) != Some(Kind::Lora) || parts.contains_key(&Part::Mid) {
        return Ok(None);
    }
    let (up, down) = (part(parts, Part::Up)?, part(parts, Part::Down)?);
    let want: usize = target.iter().product();
    if product_len(up, down) != want {
        return Err(Error::InvalidRequest(format!(
            "the change is {:?} and the model's weight is {target:?}",
            [up.dim(0)?, rows(down)?.dim(1)?]
        )));
    }
    let (mut up, mut down) = (rows(up)?, rows(down)?);
    if up.dim(1)? != down.dim(0)? {
        return Err(Error::InvalidRequest(format!(
            "up {:?} and down {:?} do not multiply",
            up.dims(),
            down.dims()
        )));
    }
    let dim = down.dim(0)?;
    if let Some(d) = dyn_dim.filter(|&d| d < dim) {
        up = up.narrow(1, 0, d)?;
        down = down.narrow(0, 0, d)?;
    }
    let scale = match (scalar(parts, Part::Scale)?, scalar(parts, Part::Alpha)?) {
        (Some(scale), _) => scale,
        (None, Some(alpha)) if dim > 0 => alpha / dim as f64,
        _ => 1.0,
    };
    Ok(Some((up.contiguous()?, down.contiguous()?, scale)))
}

/// The change of the layer's bias, `diff_b` (unscaled, as A1111 adds it), checked against
/// the bias length `len`.
pub(crate) fn bias_delta(parts: &Parts, len: usize) -> Result<Option<Tensor>> {
    let Some(b) = parts.get(&Part::DiffB) else {
        return Ok(None);
    };
    if b.elem_count() != len {
        return Err(Error::InvalidRequest(format!(
            "the bias change is {:?} and the model's bias is [{len}]",
            b.dims()
        )));
    }
    Ok(Some(b.flatten_all()?))
}

/// The layer's ΔW · scale, shaped as `target` (the model's weight), in f32; `None` for a
/// layer whose only change is its bias. The sizes are checked from the parts' shapes before
/// anything is multiplied.
pub(crate) fn delta(
    parts: &Parts,
    target: &[usize],
    dyn_dim: Option<usize>,
) -> Result<Option<Tensor>> {
    let kind = kind(parts).ok_or_else(|| {
        Error::InvalidRequest(format!(
            "incomplete layer (parts {:?})",
            parts.keys().collect::<Vec<_>>()
        ))
    })?;
    let want: usize = target.iter().product();
    let mismatch = |got: &[usize]| {
        Error::InvalidRequest(format!(
            "the change is {got:?} and the model's weight is {target:?}"
        ))
    };
    let mut dim = None;
    let updown = match kind {
        Kind::Lora => {
            let (up, down) = (part(parts, Part::Up)?, part(parts, Part::Down)?);
            dim = Some(down.dim(0)?);
            match parts.get(&Part::Mid) {
                Some(mid) => {
                    let (_, _, kh, kw) = mid.dims4()?;
                    let len = product_len(up, &rows(down)?).saturating_mul(kh * kw);
                    if len != want {
                        return Err(mismatch(&[up.dim(0)?, rows(down)?.dim(1)?, kh, kw]));
                    }
                    cp(mid, &rows(up)?.t()?, down)?
                }
                None => {
                    if product_len(up, down) != want {
                        return Err(mismatch(&[up.dim(0)?, rows(down)?.dim(1)?]));
                    }
                    product(up, down, dyn_dim)?
                }
            }
        }
        Kind::Hada => {
            let w1a = part(parts, Part::HadaW1A)?;
            let w1b = part(parts, Part::HadaW1B)?;
            let w2a = part(parts, Part::HadaW2A)?;
            let w2b = part(parts, Part::HadaW2B)?;
            dim = Some(w1b.dim(0)?);
            let one = |wa: &Tensor, wb: &Tensor, t: Option<&Tensor>| -> Result<Tensor> {
                match t {
                    Some(t) => {
                        let (_, _, kh, kw) = t.dims4()?;
                        let len = rows(wa)?.dim(1)? * rows(wb)?.dim(1)? * kh * kw;
                        if len != want {
                            return Err(mismatch(&[rows(wa)?.dim(1)?, rows(wb)?.dim(1)?, kh, kw]));
                        }
                        cp(t, wa, wb)
                    }
                    None => {
                        if product_len(wa, wb) != want {
                            return Err(mismatch(&[wa.dim(0)?, rows(wb)?.dim(1)?]));
                        }
                        Ok(product(wa, wb, None)?.reshape(target)?)
                    }
                }
            };
            let u1 = one(w1a, w1b, parts.get(&Part::HadaT1))?.reshape(target)?;
            let u2 = one(w2a, w2b, parts.get(&Part::HadaT2))?.reshape(target)?;
            (u1 * u2)?
        }
        Kind::Lokr => {
            let factor = |whole: Part, a: Part, b: Part| -> Result<Tensor> {
                match parts.get(&whole) {
                    Some(w) => Ok(w.clone()),
                    None => product(part(parts, a)?, part(parts, b)?, None),
                }
            };
            let w1 = factor(Part::LokrW1, Part::LokrW1A, Part::LokrW1B)?;
            let w2 = match (parts.get(&Part::LokrW2), parts.get(&Part::LokrT2)) {
                (Some(w), _) => w.clone(),
                (None, Some(t)) => cp(t, part(parts, Part::LokrW2A)?, part(parts, Part::LokrW2B)?)?,
                (None, None) => factor(Part::LokrW2, Part::LokrW2A, Part::LokrW2B)?,
            };
            // LyCORIS takes the rank of the factored side, the second factor's first.
            dim = [Part::LokrW2B, Part::LokrW1B]
                .into_iter()
                .find_map(|p| parts.get(&p).and_then(|t| t.dims().first().copied()));
            let w1 = rows(&w1)?;
            if w1.elem_count().saturating_mul(w2.elem_count()) != want {
                return Err(mismatch(&[w1.elem_count(), w2.elem_count()]));
            }
            kron(&w1, &w2)?
        }
        Kind::Full => {
            let Some(diff) = parts.get(&Part::Diff) else {
                return Ok(None);
            };
            if diff.elem_count() != want {
                return Err(mismatch(diff.dims()));
            }
            diff.clone()
        }
    };
    if updown.elem_count() != want {
        return Err(mismatch(updown.dims()));
    }
    let scale = match (
        scalar(parts, Part::Scale)?,
        scalar(parts, Part::Alpha)?,
        dim,
    ) {
        (Some(scale), _, _) => scale,
        (None, Some(alpha), Some(dim)) if dim > 0 => alpha / dim as f64,
        _ => 1.0,
    };
    let updown = updown.reshape(target)?;
    Ok(Some(if scale == 1.0 {
        updown
    } else {
        (updown * scale)?
    }))
}

/// The largest |value| of `t` (for tests and diagnostics).
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

    fn parts(list: &[(Part, Tensor)]) -> Parts {
        list.iter().cloned().collect()
    }

    #[test]
    fn lora_is_up_times_down_times_alpha_over_rank() {
        // up [2,1], down [1,3], alpha 0.5, rank 1 → 0.5 · up·down.
        let p = parts(&[
            (Part::Up, t(&[1.0, 2.0], &[2, 1])),
            (Part::Down, t(&[3.0, 4.0, 5.0], &[1, 3])),
            (Part::Alpha, t(&[0.5], &[])),
        ]);
        let d = delta(&p, &[2, 3], None).unwrap().unwrap();
        assert_eq!(
            d.to_vec2::<f32>().unwrap(),
            vec![vec![1.5, 2.0, 2.5], vec![3.0, 4.0, 5.0]]
        );
        assert!(delta(&p, &[3, 3], None).is_err());
    }

    #[test]
    fn loha_is_the_hadamard_product_of_two_products() {
        let p = parts(&[
            (Part::HadaW1A, t(&[1.0, 2.0], &[2, 1])),
            (Part::HadaW1B, t(&[1.0, -1.0], &[1, 2])),
            (Part::HadaW2A, t(&[3.0, 1.0], &[2, 1])),
            (Part::HadaW2B, t(&[2.0, 2.0], &[1, 2])),
        ]);
        // (w1a·w1b) = [[1,-1],[2,-2]], (w2a·w2b) = [[6,6],[2,2]].
        let d = delta(&p, &[2, 2], None).unwrap().unwrap();
        assert_eq!(
            d.to_vec2::<f32>().unwrap(),
            vec![vec![6.0, -6.0], vec![4.0, -4.0]]
        );
    }

    #[test]
    fn lokr_is_the_kronecker_product() {
        let p = parts(&[
            (Part::LokrW1, t(&[1.0, 2.0], &[1, 2])),
            (Part::LokrW2, t(&[1.0, 10.0], &[2, 1])),
        ]);
        // kron([[1,2]], [[1],[10]]) = [[1,2],[10,20]].
        let d = delta(&p, &[2, 2], None).unwrap().unwrap();
        assert_eq!(
            d.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 2.0], vec![10.0, 20.0]]
        );
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
