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

/// `t` rounded to bf16 and back: what the bf16 kernels multiply.
fn bf16_rounded(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(candle_core::DType::BF16)?
        .to_dtype(candle_core::DType::F32)?)
}

#[test]
fn bf16_conv_matches_candle() -> Result<()> {
    if !super::bf16::available() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return Ok(());
    }
    // Odd channel counts (a pair padded with zero), odd sizes (a partial Winograd block),
    // a partial row panel and column tile, one image and two.
    for (batch, cin, cout, h, w) in [(2, 5, 6, 7, 9), (1, 4, 13, 17, 19), (2, 32, 40, 33, 35)] {
        let x = randn(&[batch, cin, h, w])?;
        let b = randn(&[cout])?;
        let what = format!("{cin}->{cout} {h}x{w}");
        // 1×1: a plain product of the rounded operands, so only summation order differs.
        let taps = randn(&[cout, 1, 1, cin])?;
        let conv = super::bf16::Bf16Conv::new(&taps, Some(&b))?.expect("1x1 is packed");
        let want = bf16_rounded(&x)?
            .conv2d(&bf16_rounded(&taps)?.permute((0, 3, 1, 2))?, 0, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
        check(
            &format!("bf16 conv 1x1 {what}"),
            &conv.forward(&x)?,
            &want,
            1e-5,
        )?;
        // 3×3 by Winograd: the transformed values are what is rounded, so the bound is
        // against the exact f32 convolution (measured 4e-3 to 6e-3 of the largest output on
        // these sizes; a wrong transform is off by the outputs' own size).
        let taps = randn(&[cout, 3, 3, cin])?;
        let conv = super::bf16::Bf16Conv::new(&taps, Some(&b))?.expect("3x3 is packed");
        let want = x
            .conv2d(&taps.permute((0, 3, 1, 2))?, 1, 1, 1, 1)?
            .broadcast_add(&b.reshape((1, cout, 1, 1))?)?;
        check(
            &format!("bf16 conv 3x3 {what}"),
            &conv.forward(&x)?,
            &want,
            1e-2,
        )?;
    }
    Ok(())
}

#[test]
fn bf16_linear_matches_candle_on_rounded_inputs() -> Result<()> {
    if !super::bf16::available() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return Ok(());
    }
    for (rows, inputs, outputs) in [(3, 7, 5), (77, 64, 50), (130, 320, 96)] {
        let x = randn(&[2, rows, inputs])?;
        let w = randn(&[outputs, inputs])?;
        let b = randn(&[outputs])?;
        let got = super::bf16::Bf16Linear::new(&w, Some(&b))?.forward(&x)?;
        let want = bf16_rounded(&x)?
            .broadcast_matmul(&bf16_rounded(&w)?.t()?)?
            .broadcast_add(&b)?;
        check(
            &format!("bf16 linear {rows}x{inputs}->{outputs}"),
            &got,
            &want,
            1e-5,
        )?;
        let got = super::bf16::Bf16Linear::new(&w, None)?.forward(&x)?;
        let want = bf16_rounded(&x)?.broadcast_matmul(&bf16_rounded(&w)?.t()?)?;
        check("bf16 linear without bias", &got, &want, 1e-5)?;
    }
    Ok(())
}

#[test]
fn bf16_attention_matches_the_reference_on_rounded_inputs() -> Result<()> {
    if !super::bf16::available() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        return Ok(());
    }
    // More queries than one block, an odd key count, heads of odd width, one head of 64;
    // all with enough keys for the bf16 kernel (fewer go to the exact one).
    for (batch, n, m, c, heads) in [
        (2, 300, 257, 40, 2),
        (1, 130, 301, 30, 3),
        (2, 64, 256, 64, 1),
    ] {
        let q = randn(&[batch, n, c])?;
        let k = randn(&[batch, m, c])?;
        let v = randn(&[batch, m, c])?;
        let scale = 1.0 / ((c / heads) as f64).sqrt();
        let got = super::bf16::attention(&q, &k, &v, heads, scale)?;
        // The kernel rounds q·scale, k, the probabilities and v to bf16; the probabilities'
        // rounding (relative 2⁻⁹ each; measured 1.8e-3 of the largest output) is what the
        // tolerance allows for.
        let q = bf16_rounded(&(q * scale)?)?;
        let want = super::attention::attention_reference(
            &q,
            &bf16_rounded(&k)?,
            &bf16_rounded(&v)?,
            heads,
            1.0,
        )?;
        check(
            &format!("bf16 attention {n}x{m} {c}ch {heads} heads"),
            &got,
            &want,
            5e-3,
        )?;
    }
    Ok(())
}

#[test]
fn geglu_matches_candle() -> Result<()> {
    // Rows of 2·640 (the 320-channel level's gate), values out to ±6 where erf saturates.
    let h = (Tensor::randn(0f32, 2.0, (2, 37, 1280), &Device::Cpu)?.clamp(-6f32, 6f32))?;
    let got = super::geglu(&h)?;
    let want = super::geglu::geglu_reference(&h)?;
    let (err, at) = max_rel_err(&got, &want)?;
    assert!(err < 1e-6, "geglu: max error {err} at {at}");
    assert_eq!(got.dims(), [2, 37, 640]);
    assert!(super::geglu(&Tensor::zeros(
        (2, 4),
        candle_core::DType::F32,
        &Device::Cpu
    )?)
    .is_ok());
    assert!(super::geglu(&Tensor::zeros(
        (2, 3, 5),
        candle_core::DType::F32,
        &Device::Cpu
    )?)
    .is_err());
    Ok(())
}
