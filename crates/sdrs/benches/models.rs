//! Timing harness for the kernels and the full-size models (`cargo bench -p sdrs --bench models`).
//!
//! `SDRS_BENCH=matmul,kernels,bf16,unet256,unet512,vae512` picks the cases (default: matmul and unet256);
//! `SDRS_MODEL` points at a full-size SD 1.5 file (default `/work/full/sd15-random.safetensors`);
//! `SDRS_REPEATS` sets the repeats (default 3); `SDRS_HALF=1` keeps f16 weights resident;
//! `SDRS_FAST=1` builds the models for the fast mode's bf16 products.
//! Each case prints the minimum over the repeats, because the machine is shared.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sdrs::models::unet::UNet2DConditionModel;
use sdrs::models::vae::AutoencoderKL;
use sdrs::models::ModelOptions;
use sdrs::weights::Checkpoint;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn min_time(repeats: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn matmul(repeats: usize) -> Res<()> {
    let dev = Device::Cpu;
    for (m, k, n) in [(4096, 320, 320), (1024, 1280, 5120), (4096, 2880, 320)] {
        let a = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let b = Tensor::randn(0f32, 1., (k, n), &dev)?;
        let t = min_time(repeats, || {
            a.matmul(&b)?;
            Ok(())
        })?;
        let gflops = 2.0 * (m * k * n) as f64 / t / 1e9;
        println!("matmul {m}x{k}x{n}: {:.2} ms, {gflops:.0} GFLOP/s", t * 1e3);
    }
    Ok(())
}

/// The UNet's kernel shapes at a 32² latent (256² image), batch 2, with their GFLOP/s.
fn kernels(repeats: usize) -> Res<()> {
    let dev = Device::Cpu;
    for (c, side) in [(320, 64), (320, 32), (640, 16), (1280, 8), (1280, 4)] {
        let x = Tensor::randn(0f32, 1., (2, c, side, side), &dev)?;
        // Stored [Cout, 3, 3, Cin] as the layers keep convolution weights.
        let w = Tensor::randn(0f32, 1., (c, 3, 3, c), &dev)?.permute((0, 3, 1, 2))?;
        let t = min_time(repeats, || {
            sdrs::ops::conv2d(&x, &w, None, 1, 1)?;
            Ok(())
        })?;
        let gflops = 2.0 * (2 * c * c * 9 * side * side) as f64 / t / 1e9;
        println!(
            "conv3x3 {c}ch {side}²: {:.2} ms, {gflops:.0} GFLOP/s",
            t * 1e3
        );
    }
    for (c, tokens, keys) in [(320, 1024, 1024), (320, 4096, 4096), (320, 1024, 77)] {
        let q = Tensor::randn(0f32, 1., (2, tokens, c), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, keys, c), &dev)?;
        let t = min_time(repeats, || {
            sdrs::ops::attention(&q, &k, &k, 8, 0.15)?;
            Ok(())
        })?;
        let gflops = 4.0 * (2 * tokens * keys * c) as f64 / t / 1e9;
        println!(
            "attention {tokens}x{keys} {c}ch: {:.2} ms, {gflops:.0} GFLOP/s",
            t * 1e3
        );
    }
    Ok(())
}

/// The fast mode's bf16 kernels on the UNet's shapes at a 64² latent (512² image), batch 2,
/// beside the exact kernels on the same shapes.
fn bf16(repeats: usize) -> Res<()> {
    if !sdrs::fast_available() {
        println!("bf16: this CPU lacks AVX512-BF16");
        return Ok(());
    }
    let dev = Device::Cpu;
    for (c, side) in [(320, 64), (640, 32), (1280, 16), (1280, 8), (512, 128)] {
        let x = Tensor::randn(0f32, 1., (2, c, side, side), &dev)?;
        let taps = Tensor::randn(0f32, 1., (c, 3, 3, c), &dev)?;
        let conv = sdrs::ops::bf16::Bf16Conv::new(&taps, None)?.ok_or("3x3 is packed")?;
        let w = taps.permute((0, 3, 1, 2))?;
        let fast = min_time(repeats, || {
            conv.forward(&x)?;
            Ok(())
        })?;
        let exact = min_time(repeats, || {
            sdrs::ops::conv2d(&x, &w, None, 1, 1)?;
            Ok(())
        })?;
        let flops = 2.0 * (2 * c * c * 9 * side * side) as f64 / 1e9;
        println!(
            "conv3x3 {c}ch {side}²: bf16 {:.2} ms ({:.0} GFLOP/s), f32 {:.2} ms ({:.0} GFLOP/s)",
            fast * 1e3,
            flops / fast,
            exact * 1e3,
            flops / exact
        );
    }
    for (c, heads, tokens, keys) in [
        (320, 8, 4096, 4096),
        (320, 8, 4096, 77),
        (512, 1, 4096, 4096),
    ] {
        let q = Tensor::randn(0f32, 1., (2, tokens, c), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, keys, c), &dev)?;
        let fast = min_time(repeats, || {
            sdrs::ops::bf16::attention(&q, &k, &k, heads, 0.15)?;
            Ok(())
        })?;
        let exact = min_time(repeats, || {
            sdrs::ops::attention(&q, &k, &k, heads, 0.15)?;
            Ok(())
        })?;
        let flops = 4.0 * (2 * tokens * keys * c) as f64 / 1e9;
        println!(
            "attention {tokens}x{keys} {c}ch {heads} heads: bf16 {:.2} ms ({:.0} GFLOP/s), f32 {:.2} ms ({:.0} GFLOP/s)",
            fast * 1e3,
            flops / fast,
            exact * 1e3,
            flops / exact
        );
    }
    for (m, k, n) in [(8192, 320, 320), (8192, 320, 2560), (8192, 1280, 320)] {
        let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?;
        let linear = sdrs::ops::bf16::Bf16Linear::new(&w, None)?;
        let fast = min_time(repeats, || {
            linear.forward(&x)?;
            Ok(())
        })?;
        let wt = w.t()?;
        let exact = min_time(repeats, || {
            x.matmul(&wt)?;
            Ok(())
        })?;
        let flops = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "linear {m}x{k}->{n}: bf16 {:.2} ms ({:.0} GFLOP/s), f32 {:.2} ms ({:.0} GFLOP/s)",
            fast * 1e3,
            flops / fast,
            exact * 1e3,
            flops / exact
        );
    }
    Ok(())
}

fn main() -> Res<()> {
    let cases = std::env::var("SDRS_BENCH").unwrap_or_else(|_| "matmul,unet256".into());
    let repeats = std::env::var("SDRS_REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let opts = ModelOptions {
        half_weights: std::env::var("SDRS_HALF").is_ok_and(|v| v == "1"),
        fast: std::env::var("SDRS_FAST").is_ok_and(|v| v == "1"),
    };
    let model =
        std::env::var("SDRS_MODEL").unwrap_or_else(|_| "/work/full/sd15-random.safetensors".into());
    let dev = Device::Cpu;
    // As the binaries that run models do, so the kernel cases see the same allocator behaviour.
    sdrs::keep_freed_memory();
    for case in cases.split(',') {
        match case {
            "matmul" => matmul(repeats)?,
            "kernels" => kernels(repeats)?,
            "bf16" => bf16(repeats)?,
            "unet256" | "unet512" => {
                let load = Instant::now();
                let ckpt = Checkpoint::open(std::path::Path::new(&model))?;
                let unet = UNet2DConditionModel::new_with(
                    ckpt.unet(DType::F32, &dev)?,
                    ckpt.unet_config(),
                    opts,
                )?;
                println!("unet load: {:.2} s", load.elapsed().as_secs_f64());
                let side = if case == "unet256" { 32 } else { 64 };
                // Batch 2: one step with classifier-free guidance.
                let x = Tensor::randn(0f32, 1., (2, 4, side, side), &dev)?;
                let ctx = Tensor::randn(0f32, 1., (2, 77, 768), &dev)?;
                let t = min_time(repeats, || {
                    unet.forward(&x, 500.0, &ctx)?;
                    Ok(())
                })?;
                println!("{case} step (CFG batch 2): {t:.3} s");
            }
            "vae512" => {
                let ckpt = Checkpoint::open(std::path::Path::new(&model))?;
                let vae =
                    AutoencoderKL::new_with(ckpt.vae(DType::F32, &dev)?, ckpt.vae_config(), opts)?;
                let z = Tensor::randn(0f32, 1., (1, 4, 64, 64), &dev)?;
                let t = min_time(repeats, || {
                    vae.decode(&z)?;
                    Ok(())
                })?;
                println!("vae512 decode: {t:.3} s");
            }
            other => return Err(format!("unknown case {other}").into()),
        }
    }
    Ok(())
}
