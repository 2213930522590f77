//! `sdrs bench`: the time, achieved GFLOP/s and peak memory of each phase of a generation —
//! text encoding, one UNet step with guidance, one VAE decode, and a whole image — on a real
//! checkpoint, as a table or JSON (what `tools/bench_torch.py` compares with PyTorch).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use sdrs::hub::Hub;
use sdrs::limits::{exceeded, image_fits, MAX_BENCH_REPEATS, MAX_PIXELS, MAX_STEPS};
use sdrs::pipeline::flops;
use sdrs::pipeline::{
    decode, txt2img, CfgDenoiser, GenerationRequest, LoadOptions, StableDiffusion,
};
use sdrs::prompt::PromptSyntax;
use sdrs::sampling::rng::{NormalVariant, TorchRng};
use sdrs::sampling::{Denoiser, Flow, NoiseSource};
use sdrs::weights::Checkpoint;
use serde_json::json;

use crate::download::resolve_model;
use crate::txt2img::network_options;

/// Arguments of `sdrs bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The checkpoint: a file, a diffusers folder, or a catalogue name [default: the default
    /// model].
    #[arg(long)]
    model: Option<String>,
    /// Image side in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Euler steps of the whole-image phase.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Runs of each phase but the whole image (which runs once); the median is reported.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Measure with one network resident at a time, as `txt2img --lowmem`.
    #[arg(long)]
    lowmem: bool,
    /// Measure the fast mode's bf16 products, as `txt2img --fast`.
    #[arg(long)]
    fast: bool,
    /// Also time merging this LoRA file at multiplier 1 (the first time, which reads the
    /// file, and then the median), a UNet step with it merged, and removing it.
    #[arg(long, value_name = "FILE")]
    lora: Option<std::path::PathBuf>,
}

const PROMPT: &str = "a photograph of an astronaut riding a horse on the moon, detailed";
const NEGATIVE: &str = "blurry, low quality";
const CFG_SCALE: f64 = 7.5;

struct Phase {
    name: &'static str,
    seconds: f64,
    flops: Option<f64>,
    /// Bytes; the peak of this phase alone where the kernel lets the peak be reset.
    peak_rss: Option<u64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.size == 0 || !args.size.is_multiple_of(8) {
        bail!("--size must be a positive multiple of 8, not {}", args.size);
    }
    if args.steps == 0 || args.repeats == 0 {
        bail!("--steps and --repeats must be at least 1");
    }
    if !image_fits(args.size, args.size) {
        bail!(exceeded(
            "--size squared",
            args.size.saturating_mul(args.size),
            "MAX_PIXELS",
            MAX_PIXELS
        ));
    }
    if args.steps > MAX_STEPS {
        bail!(exceeded("--steps", args.steps, "MAX_STEPS", MAX_STEPS));
    }
    if args.repeats > MAX_BENCH_REPEATS {
        bail!(exceeded(
            "--repeats",
            args.repeats,
            "MAX_BENCH_REPEATS",
            MAX_BENCH_REPEATS
        ));
    }
    let resolved = resolve_model(&Hub::from_env(), args.model.as_deref())?;
    let path = &resolved.path;
    let device = candle_core::Device::Cpu;
    let per_phase_peaks = reset_peak_rss();

    let started = Instant::now();
    let checkpoint =
        Checkpoint::open(path).with_context(|| format!("loading checkpoint {}", path.display()))?;
    let lora = args
        .lora
        .as_deref()
        .map(|file| -> Result<(std::path::PathBuf, String)> {
            let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
            let Some(stem) = file.file_stem().and_then(|s| s.to_str()) else {
                bail!("--lora {}: not a file name", file.display());
            };
            Ok((dir, stem.to_string()))
        })
        .transpose()?;
    let options = LoadOptions {
        networks: network_options(args.lowmem, args.fast, &device),
        lora_dir: lora.as_ref().map(|(dir, _)| dir.clone()),
        ..LoadOptions::default()
    };
    let sd = StableDiffusion::load_with(&checkpoint, &device, options)
        .with_context(|| format!("loading checkpoint {}", path.display()))?;
    let mut phases = vec![Phase {
        name: "load",
        seconds: started.elapsed().as_secs_f64(),
        flops: None,
        peak_rss: peak_rss(),
    }];

    let latent_side = args.size / sd.vae_config().downscale_factor();
    let tokens = checkpoint.clip_config().max_position_embeddings;
    let text_flops = (0..)
        .map_while(|i| checkpoint.text_encoder_config(i))
        .map(|(config, _)| flops::text_encode(config, tokens).times(2.0))
        .reduce(|a, b| a.plus(&b))
        .unwrap_or_default();
    let step_flops =
        flops::unet_cfg_step(checkpoint.unet_config(), latent_side, latent_side, tokens);
    let decode_flops = flops::vae_decode(checkpoint.vae_config(), latent_side, latent_side);

    let mut measure = |name, flops: f64, repeats, f: &mut dyn FnMut() -> Result<()>| {
        phases.push(median_phase(name, Some(flops), repeats, f)?);
        anyhow::Ok(())
    };

    let size = sdrs::pipeline::SizeIds::of(args.size, args.size);
    let conditioning = |sd: &StableDiffusion| {
        sd.conditioning(PROMPT, NEGATIVE, PromptSyntax::Auto, args.steps, 1, size)
    };
    measure("text encode", text_flops.total(), args.repeats, &mut || {
        conditioning(&sd)?;
        Ok(())
    })?;

    let cond = conditioning(&sd)?;
    let mut noise = TorchRng::new(1, NormalVariant::default());
    let latent_channels = sd.vae_config().latent_channels;
    let x = noise.sample(&[1, latent_channels, latent_side, latent_side], &device)?;
    measure(
        "UNet step (CFG)",
        step_flops.total(),
        args.repeats,
        &mut || {
            let mut denoiser = CfgDenoiser::new(&sd, &cond, CFG_SCALE);
            denoiser.denoise(&x, 1.0, 0)?;
            Ok(())
        },
    )?;

    measure(
        "VAE decode",
        decode_flops.total(),
        args.repeats,
        &mut || {
            decode(&sd, &x, 0.0)?;
            Ok(())
        },
    )?;

    let request = GenerationRequest {
        prompt: PROMPT.into(),
        negative_prompt: NEGATIVE.into(),
        width: args.size,
        height: args.size,
        steps: args.steps,
        cfg_scale: CFG_SCALE,
        sampler_name: "Euler".into(),
        seed: 1,
        ..Default::default()
    };
    let gen = request.validate()?;
    let image_flops =
        text_flops.total() + step_flops.total() * args.steps as f64 + decode_flops.total();
    measure("whole image", image_flops, 1, &mut || {
        txt2img(&sd, &gen, &mut |_| Flow::Continue)?;
        Ok(())
    })?;

    if let Some((_, stem)) = &lora {
        let with = |prompt: String| {
            GenerationRequest {
                prompt,
                ..Default::default()
            }
            .validate()
        };
        let merged = with(format!("{PROMPT} <lora:{stem}:1>"))?;
        let plain = with(PROMPT.into())?;
        let mut time = |name, gen: &sdrs::Generation| -> Result<()> {
            reset_peak_rss();
            let t = Instant::now();
            sd.apply_loras(gen)?;
            phases.push(Phase {
                name,
                seconds: t.elapsed().as_secs_f64(),
                flops: None,
                peak_rss: peak_rss(),
            });
            Ok(())
        };
        time("LoRA first apply", &merged)?;
        time("LoRA remove", &plain)?;
        let (mut applies, mut removes) = (Vec::new(), Vec::new());
        for _ in 0..args.repeats {
            let t = Instant::now();
            sd.apply_loras(&merged)?;
            applies.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            sd.apply_loras(&plain)?;
            removes.push(t.elapsed().as_secs_f64());
        }
        for (name, mut times) in [("LoRA apply", applies), ("LoRA remove", removes)] {
            times.sort_by(f64::total_cmp);
            phases.push(Phase {
                name,
                seconds: times[times.len() / 2],
                flops: None,
                peak_rss: None,
            });
        }
        sd.apply_loras(&merged)?;
        phases.push(median_phase(
            "UNet step + LoRA",
            Some(step_flops.total()),
            args.repeats,
            &mut || {
                CfgDenoiser::new(&sd, &cond, CFG_SCALE).denoise(&x, 1.0, 0)?;
                Ok(())
            },
        )?);
        sd.apply_loras(&plain)?;
    }

    if args.json {
        print_json(&args, path, &phases, per_phase_peaks, sd.fast());
    } else {
        print_table(&args, path, &phases, per_phase_peaks, sd.fast());
    }
    Ok(())
}

/// The median time of `repeats` runs of `f`, with the peak memory they reached.
fn median_phase(
    name: &'static str,
    flops: Option<f64>,
    repeats: usize,
    f: &mut dyn FnMut() -> Result<()>,
) -> Result<Phase> {
    reset_peak_rss();
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(Phase {
        name,
        seconds: times[times.len() / 2],
        flops,
        peak_rss: peak_rss(),
    })
}

fn print_json(args: &BenchArgs, path: &Path, phases: &[Phase], per_phase_peaks: bool, fast: bool) {
    let phases: Vec<_> = phases
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "seconds": p.seconds,
                "flops": p.flops,
                "gflops_per_s": p.flops.map(|f| f / p.seconds / 1e9),
                "peak_rss_bytes": p.peak_rss,
            })
        })
        .collect();
    let out = json!({
        "model": path.display().to_string(),
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "lowmem": args.lowmem,
        "fast": fast,
        "threads": threads(),
        "per_phase_peaks": per_phase_peaks,
        "phases": phases,
    });
    println!("{out}");
}

fn print_table(args: &BenchArgs, path: &Path, phases: &[Phase], per_phase_peaks: bool, fast: bool) {
    println!(
        "sdrs bench: {} at {}², {} Euler steps, median of {} ({} threads{}{})",
        path.display(),
        args.size,
        args.steps,
        args.repeats,
        threads(),
        if args.lowmem { ", --lowmem" } else { "" },
        if fast { ", --fast: bf16 products" } else { "" }
    );
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>12}",
        "phase", "time", "GFLOP", "GFLOP/s", "peak RSS"
    );
    for p in phases {
        let (gflop, rate) = match p.flops {
            Some(f) => (
                format!("{:.0}", f / 1e9),
                format!("{:.0}", f / p.seconds / 1e9),
            ),
            None => ("-".into(), "-".into()),
        };
        let rss = p.peak_rss.map_or("-".into(), |b| {
            format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
        });
        let name = if p.name == "whole image" {
            format!("image ({} steps)", args.steps)
        } else {
            p.name.to_string()
        };
        println!(
            "{name:<18} {:>9.2}s {gflop:>10} {rate:>10} {rss:>12}",
            p.seconds
        );
    }
    if !per_phase_peaks {
        println!("(peak RSS is the process's peak so far: this kernel cannot reset it per phase)");
    }
}

fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Starts a new peak-RSS measurement (Linux: writing 5 to `clear_refs` resets `VmHWM`);
/// whether it could.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident set size (`VmHWM`) in bytes, where the system reports it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
