//! Each kernel against candle's plain operations on random inputs.

use candle_core::{Device, Tensor};

use crate::Result;

/// Largest |got − want| relative to max |want|, with its flat position.
fn max_rel_err(got: &Tensor, want: &Tensor) -> Result<(f32, usize)> {
    assert_eq!(got.dims(), want.dims());
    let g = got.flatten_all()?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (pos, err) = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold(
            (0, 0f32),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        );
    Ok((err / scale, pos))
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f32) -> Result<()> {
    let (err, pos) = max_rel_err(got, want)?;
    assert!(err <= tol, "{what}: max relative error {err:e} at {pos}");
    Ok(())
}

fn randn(shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1., shape, &Device::Cpu)?)
}

#[test]
fn conv3x3_matches_candle() -> Result<()> {
    let x = randn(&[2, 5, 7, 9])?;
    let w = randn(&[6, 5, 3, 3])?;
    let b = randn(&[6])?;
    let got = super::conv2d(&x, &w, Some(&b), 1, 1)?;
    let want = x
        .conv2d(&w, 1, 1, 1, 1)?
        .broadcast_add(&b.reshape((1, 6, 1, 1))?)?;
    check("conv 3x3", &got, &want, 1e-5)?;
    // The same weights stored [Cout, 3, 3, Cin], as the layers keep them.
    let taps = w
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .permute((0, 3, 1, 2))?;
    let got = super::conv2d(&x, &taps, Some(&b), 1, 1)?;
    check("conv 3x3, channels-last weights", &got, &want, 1e-5)?;
    // A large image takes the shifted-view path rather than the im2col one.
    let x = randn(&[2, 5, 17, 19])?;
    let got = super::conv2d(&x, &taps, Some(&b), 1, 1)?;
    let want = x
        .conv2d(&w, 1, 1, 1, 1)?
        .broadcast_add(&b.reshape((1, 6, 1, 1))?)?;
    check("conv 3x3 on 17x19", &got, &want, 1e-5)
}

#[test]
fn conv1x1_matches_candle() -> Result<()> {
    let x = randn(&[2, 8, 5, 3])?;
    let w = randn(&[4, 8, 1, 1])?;
    let got = super::conv2d(&x, &w, None, 0, 1)?;
    check("conv 1x1", &got, &x.conv2d(&w, 0, 1, 1, 1)?, 1e-5)
}

#[test]
fn strided_conv_falls_back_to_candle() -> Result<()> {
    let x = randn(&[1, 3, 8, 8])?;
    let w = randn(&[2, 3, 3, 3])?;
    let got = super::conv2d(&x, &w, None, 1, 2)?;
    check("conv stride 2", &got, &x.conv2d(&w, 1, 2, 1, 1)?, 0.0)
}

#[test]
fn attention_matches_full_softmax() -> Result<()> {
    // 300 queries: two full blocks of 128 and a partial one; 3 heads of 8 channels.
    for m in [300, 77] {
        let q = randn(&[2, 300, 24])?;
        let k = (randn(&[2, m, 24])? * 3.0)?;
        let v = randn(&[2, m, 24])?;
        let got = super::attention(&q, &k, &v, 3, 0.35)?;
        let want = super::attention::attention_reference(&q, &k, &v, 3, 0.35)?;
        check(&format!("attention over {m} keys"), &got, &want, 1e-5)?;
    }
    Ok(())
}

#[test]
fn group_norm_silu_matches_candle() -> Result<()> {
    let x = randn(&[2, 12, 5, 7])?.affine(4.0, 1.5)?;
    let w = randn(&[12])?;
    let b = randn(&[12])?;
    for silu in [false, true] {
        let got = super::group_norm(&x, &w, &b, 4, 1e-6, silu)?;
        let want = super::norm::group_norm_reference(&x, &w, &b, 4, 1e-6, silu)?;
        check(&format!("group norm (silu {silu})"), &got, &want, 1e-5)?;
    }
    Ok(())
}

#[test]
fn widening_matches_to_dtype() -> Result<()> {
    let x = randn(&[3, 70])?;
    for dtype in [candle_core::DType::F16, candle_core::DType::BF16] {
        let half = x.to_dtype(dtype)?;
        let got = super::widen::to_f32(&half)?;
        check(
            "widened",
            &got,
            &half.to_dtype(candle_core::DType::F32)?,
            0.0,
        )?;
    }
    Ok(())
}
