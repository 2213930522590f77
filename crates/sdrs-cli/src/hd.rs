//! `sdrs hd`: txt2imghd — generate (or take `--img`), then enlarge ×2 per pass and redraw in
//! overlapping tiles.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sdrs::hub::Hub;
use sdrs::image_io::load_image;
use sdrs::output::{ImageFormat, OutputDir};
use sdrs::pipeline::{final_size, hd, Event, HdEvent, HdOptions};
use sdrs::sampling::Flow;
use sdrs::upscale::{BuiltinUpscaler, Upscaler};

use crate::txt2img::GenerationArgs;

/// Arguments of `sdrs hd`.
#[derive(Args)]
pub struct HdArgs {
    #[command(flatten)]
    common: GenerationArgs,
    /// Start from this picture instead of generating one (its size is rounded down to 8).
    #[arg(long)]
    img: Option<PathBuf>,
    /// Number of ×2 passes.
    #[arg(long, default_value_t = 1)]
    passes: usize,
    /// How much each tile is redrawn (img2img strength).
    #[arg(long, default_value_t = 0.3)]
    strength: f64,
    /// Overlap of neighbouring tiles in pixels, blended with linear ramps.
    #[arg(long, default_value_t = 64)]
    overlap: usize,
    /// Sampling steps per tile, before the strength cut [default: --steps].
    #[arg(long = "detail-steps")]
    detail_steps: Option<usize>,
    /// CFG scale per tile [default: --scale].
    #[arg(long = "detail-scale")]
    detail_scale: Option<f64>,
    #[arg(long, default_value = "lanczos", help = upscaler_help())]
    upscaler: String,
}

/// `--upscaler`'s help, naming the built-in image upscalers from the library's list.
fn upscaler_help() -> String {
    let names: Vec<&str> = BuiltinUpscaler::all()
        .into_iter()
        .filter(|u| !u.is_latent())
        .map(|u| u.name())
        .collect();
    format!(
        "The ×2 upscaler: {}, or an ESRGAN / Real-ESRGAN model file",
        names.join(", ")
    )
}

pub fn run(args: HdArgs) -> Result<()> {
    let hub = Hub::from_env();
    let defaults = args.common.model_defaults(&hub);
    let mut request = args.common.request(&defaults);
    (request.width, request.height) = args.common.size(&defaults);
    let gen = request.validate()?;
    let start = match &args.img {
        Some(path) => Some(load_image(path).context("reading the start picture")?),
        None => None,
    };
    let (w, h) = match &start {
        Some(img) => (img.width() as usize / 8 * 8, img.height() as usize / 8 * 8),
        None => (request.width, request.height),
    };
    let (final_w, final_h) = final_size(w, h, args.passes)?;
    let opts = HdOptions {
        passes: args.passes,
        strength: args.strength,
        overlap: args.overlap,
        detail_steps: args.detail_steps,
        detail_scale: args.detail_scale,
    };
    let device = args.common.device()?;
    let upscaler = match args.upscaler.parse::<BuiltinUpscaler>() {
        Ok(builtin) => Upscaler::built_in(builtin)?,
        Err(_) => {
            let path = PathBuf::from(&args.upscaler);
            Upscaler::open(&path, &device)
                .with_context(|| format!("loading upscaler {}", path.display()))?
        }
    };
    let outdir = args
        .common
        .outdir()
        .unwrap_or_else(|| PathBuf::from("outputs/hd-samples"));
    let mut out = OutputDir::prepare(&outdir)
        .with_context(|| format!("cannot use the output directory {}", outdir.display()))?;
    eprintln!(
        "hd: {w}x{h} -> {final_w}x{final_h} in {} pass(es), seed {}",
        args.passes,
        gen.request().seed
    );

    let started = Instant::now();
    let sd = args.common.load_model(&hub, &device)?;
    let style = ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::new(1).with_style(style);
    let result = hd(&sd, &gen, start.as_ref(), &upscaler, &opts, &mut |event| {
        match event {
            HdEvent::Base(Event::Step { step, steps, .. }) => {
                bar.set_message("base image");
                bar.set_length(steps as u64);
                bar.set_position(step as u64);
            }
            HdEvent::Base(Event::Image { .. }) => {}
            HdEvent::Tile {
                pass,
                passes,
                tile,
                tiles,
            } => {
                bar.set_message(format!(
                    "pass {}/{passes} tile {}/{tiles}",
                    pass + 1,
                    tile + 1
                ));
                bar.set_position(0);
            }
            HdEvent::Step { step, steps } => {
                bar.set_length(steps as u64);
                bar.set_position(step as u64);
            }
        }
        Flow::Continue
    });
    bar.finish_and_clear();
    let Some(image) = result? else {
        bail!("hd was stopped before it finished");
    };
    let saved = out.save(&image, ImageFormat::Png)?;
    println!("{}", saved.path.display());
    eprintln!(
        "{}x{} in {:.1}s",
        image.image.width(),
        image.image.height(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
