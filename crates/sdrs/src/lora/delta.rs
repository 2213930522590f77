//! ΔW of one layer from its LoRA parts, by the formulas of A1111's built-in Lora extension
//! (`network_lora.py`, `network_hada.py`, `network_lokr.py`, `network_full.py`,
//! `lyco_helpers.py`), which LyCORIS defines: ΔW · scale, where scale is the file's `scale`,
//! else alpha / rank, else 1.

use candle_core::Tensor;

use super::file::{Part, Parts};
use super::products::{cp, cp_shape, kron, product, product_dims, product_of, rows};
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

fn invalid(message: String) -> Error {
    Error::InvalidRequest(message)
}

fn part(parts: &Parts, p: Part) -> Result<&Tensor> {
    parts
        .get(&p)
        .ok_or_else(|| invalid(format!("a layer lacks its {} part", p.label())))
}

/// Refuses a layer whose parts have ranks no trainer writes (above 4-D; `up`, `down` neither
/// a matrix nor a kernel; cores that are not 4-D).
fn check_ranks(parts: &Parts) -> Result<()> {
    for (p, t) in parts {
        let n = t.rank();
        let fits = match p {
            Part::Up | Part::Down => n == 2 || n == 4,
            Part::Mid | Part::HadaT1 | Part::HadaT2 | Part::LokrT2 => n == 4,
            _ => n <= 4,
        };
        if !fits {
            return Err(invalid(format!(
                "its {} is {n}-D {:?}",
                p.label(),
                t.dims()
            )));
        }
    }
    Ok(())
}

/// A scalar part (`alpha`, `scale`) as f64.
fn scalar(parts: &Parts, p: Part) -> Result<Option<f64>> {
    parts
        .get(&p)
        .map(|t| {
            if t.elem_count() != 1 {
                return Err(invalid(format!(
                    "its {} holds {} values, not one",
                    p.label(),
                    t.elem_count()
                )));
            }
            Ok(t.flatten_all()?.to_vec1::<f32>()?[0] as f64)
        })
        .transpose()
}

/// A plain LoRA layer's change as its two factors: `(up [out, r], down [r, in·k·k], scale)`
/// with `dyn` applied, so that ΔW = scale · up · down can be added by one matrix product;
/// `None` for every other kind (and LoRA through a Tucker core). Shapes, ranks and sizes are
/// checked as in [`delta`].
pub(crate) fn factors(
    parts: &Parts,
    target: &[usize],
    dyn_dim: Option<usize>,
) -> Result<Option<(Tensor, Tensor, f64)>> {
    if kind(parts) != Some(Kind::Lora) || parts.contains_key(&Part::Mid) {
        return Ok(None);
    }
    check_ranks(parts)?;
    let (up, down) = (part(parts, Part::Up)?, part(parts, Part::Down)?);
    let (out, inp) = product_dims(up, down, "lora_up · lora_down")?;
    if product_of(&[out, inp]) != product_of(target) {
        return Err(invalid(format!(
            "the change is {:?} and the model's weight is {target:?}",
            [out, inp]
        )));
    }
    let (mut up, mut down) = (rows(up)?, rows(down)?);
    let dim = down.dim(0)?;
    if let Some(d) = dyn_dim.filter(|&d| d < dim) {
        up = up.narrow(1, 0, d)?;
        down = down.narrow(0, 0, d)?;
    }
    let scale = match (scalar(parts, Part::Scale)?, scalar(parts, Part::Alpha)?) {
        (Some(scale), _) => scale,
        (None, Some(alpha)) => alpha / dim as f64,
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
        return Err(invalid(format!(
            "the bias change is {:?} and the model's bias is [{len}]",
            b.dims()
        )));
    }
    Ok(Some(b.flatten_all()?))
}

/// The size of a LoKr factor, from the shapes alone: whole (`whole`), a product (`a · b`) or,
/// given `core`, a Tucker rebuild.
fn lokr_factor_len(
    parts: &Parts,
    whole: Part,
    a: Part,
    b: Part,
    core: Option<Part>,
) -> Result<usize> {
    if let Some(w) = parts.get(&whole) {
        return product_of(w.dims())
            .ok_or_else(|| invalid(format!("its {} has too many values", whole.label())));
    }
    let (wa, wb) = (part(parts, a)?, part(parts, b)?);
    if let Some(t) = core.and_then(|c| parts.get(&c)) {
        return Ok(product_of(&cp_shape(t, wa, wb)?).unwrap_or(usize::MAX));
    }
    let (rows, cols) = product_dims(wa, wb, &format!("{} · {}", a.label(), b.label()))?;
    Ok(rows.saturating_mul(cols))
}

/// The layer's ΔW · scale, shaped as `target` (the model's weight), in f32; `None` for a
/// layer whose only change is its bias. Every part's shape, every rank and the size of the
/// result are checked before anything is multiplied.
pub(crate) fn delta(
    parts: &Parts,
    target: &[usize],
    dyn_dim: Option<usize>,
) -> Result<Option<Tensor>> {
    let kind = kind(parts).ok_or_else(|| {
        invalid(format!(
            "incomplete layer (parts {:?})",
            parts.keys().map(|p| p.label()).collect::<Vec<_>>()
        ))
    })?;
    check_ranks(parts)?;
    let want: usize = target.iter().product();
    let mismatch = |got: &[usize]| {
        invalid(format!(
            "the change is {got:?} and the model's weight is {target:?}"
        ))
    };
    // The size a change of shape `dims` has, which must be the weight's.
    let fits = |dims: &[usize]| -> Result<()> {
        match product_of(dims) {
            Some(n) if n == want => Ok(()),
            _ => Err(mismatch(dims)),
        }
    };
    let dim;
    let updown = match kind {
        Kind::Lora => {
            let (up, down) = (part(parts, Part::Up)?, part(parts, Part::Down)?);
            match parts.get(&Part::Mid) {
                Some(mid) => {
                    // The core sits between up's columns and down's rows.
                    let shape = cp_shape(mid, &rows(up)?.t()?, down)?;
                    fits(&shape)?;
                    dim = Some(down.dim(0)?);
                    cp(mid, &rows(up)?.t()?, down)?
                }
                None => {
                    let (out, inp) = product_dims(up, down, "lora_up · lora_down")?;
                    fits(&[out, inp])?;
                    dim = Some(down.dim(0)?);
                    product(up, down, dyn_dim, "lora_up · lora_down")?
                }
            }
        }
        Kind::Hada => {
            let w1a = part(parts, Part::HadaW1A)?;
            let w1b = part(parts, Part::HadaW1B)?;
            let w2a = part(parts, Part::HadaW2A)?;
            let w2b = part(parts, Part::HadaW2B)?;
            // Both halves are checked before either is built.
            let pairs = [
                (w1a, w1b, parts.get(&Part::HadaT1), "hada_w1_a · hada_w1_b"),
                (w2a, w2b, parts.get(&Part::HadaT2), "hada_w2_a · hada_w2_b"),
            ];
            for (wa, wb, t, what) in pairs {
                match t {
                    Some(t) => fits(&cp_shape(t, wa, wb)?)?,
                    None => {
                        let (out, inp) = product_dims(wa, wb, what)?;
                        fits(&[out, inp])?;
                    }
                }
            }
            dim = Some(w1b.dim(0)?);
            let mut halves = Vec::with_capacity(2);
            for (wa, wb, t, what) in pairs {
                let half = match t {
                    Some(t) => cp(t, wa, wb)?,
                    None => product(wa, wb, None, what)?,
                };
                halves.push(half.reshape(target)?);
            }
            (&halves[0] * &halves[1])?
        }
        Kind::Lokr => {
            let w1_len = lokr_factor_len(parts, Part::LokrW1, Part::LokrW1A, Part::LokrW1B, None)?;
            let w2_len = lokr_factor_len(
                parts,
                Part::LokrW2,
                Part::LokrW2A,
                Part::LokrW2B,
                Some(Part::LokrT2),
            )?;
            if w1_len.checked_mul(w2_len) != Some(want) {
                return Err(mismatch(&[w1_len, w2_len]));
            }
            let factor = |whole: Part, a: Part, b: Part| -> Result<Tensor> {
                match parts.get(&whole) {
                    Some(w) => Ok(w.clone()),
                    None => product(part(parts, a)?, part(parts, b)?, None, a.label()),
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
            kron(&rows(&w1)?, &w2)?
        }
        Kind::Full => {
            let Some(diff) = parts.get(&Part::Diff) else {
                return Ok(None);
            };
            fits(diff.dims())?;
            dim = None;
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
    fn sizes_are_checked_before_anything_is_built() {
        // w1a · w1b would be 2³² values: refused from the shapes alone.
        let p = parts(&[
            (
                Part::LokrW1A,
                Tensor::zeros((1 << 16, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                Part::LokrW1B,
                Tensor::zeros((1, 1 << 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (Part::LokrW2, t(&[1.0], &[1, 1])),
        ]);
        let e = delta(&p, &[64, 64], None).unwrap_err().to_string();
        assert!(e.contains("[4294967296, 1]"), "{e}");
        // A rank past the limit, and a rank of 0.
        let r = crate::limits::MAX_LORA_RANK + 1;
        let p = parts(&[
            (
                Part::Up,
                Tensor::zeros((2, r), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
            (
                Part::Down,
                Tensor::zeros((r, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
        ]);
        let e = delta(&p, &[2, 2], None).unwrap_err().to_string();
        assert!(e.contains("MAX_LORA_RANK"), "{e}");
        let p = parts(&[(Part::Up, t(&[], &[2, 0])), (Part::Down, t(&[], &[0, 2]))]);
        let e = delta(&p, &[2, 2], None).unwrap_err().to_string();
        assert!(e.contains("rank of 0"), "{e}");
    }
}
