//! `sdrs upscale`: enlarge a picture with an ESRGAN-family network, or Lanczos without one.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sdrs::image_io::load_image;
use sdrs::output::{write_new, ImageFormat};
use sdrs::upscale::{Tiling, Upscaler};

/// Arguments of `sdrs upscale`.
#[derive(Args)]
pub struct UpscaleArgs {
    /// The network: an ESRGAN / Real-ESRGAN `.pth` or `.safetensors` (RRDBNet or
    /// SRVGGNetCompact). Without it the picture is resized with Lanczos.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Enlargement factor; a network only does its own (the default), Lanczos any (default 4).
    #[arg(long)]
    scale: Option<u32>,
    /// Tile side in input pixels, so a big picture never runs in one pass; 0: no tiles.
    #[arg(long, default_value_t = Tiling::default().tile)]
    tile: usize,
    /// Extra input pixels around each tile whose output is cropped (Real-ESRGAN's tile_pad).
    #[arg(long = "tile-pad", alias = "tile_pad", default_value_t = Tiling::default().pad)]
    tile_pad: usize,
    /// The picture to enlarge: PNG, JPEG or WebP.
    input: PathBuf,
    /// Where to write the result (.png or .jpg); an existing file is not overwritten.
    output: PathBuf,
}

pub fn run(args: UpscaleArgs) -> Result<()> {
    let ext = args
        .output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
        bail!(
            "{}: the output must end in .png, .jpg or .jpeg",
            args.output.display()
        );
    }
    if args.output.symlink_metadata().is_ok() {
        bail!("{} exists; not overwriting it", args.output.display());
    }
    let mut upscaler = match &args.model {
        Some(path) => Upscaler::open(path, &candle_core::Device::Cpu)
            .with_context(|| format!("loading upscaler {}", path.display()))?,
        None => Upscaler::Lanczos,
    };
    upscaler.set_tiling(Tiling {
        tile: args.tile,
        pad: args.tile_pad,
    })?;
    let scale = args.scale.or(upscaler.native_scale()).unwrap_or(4);
    let image = load_image(&args.input).context("reading the input picture")?;
    let start = Instant::now();
    let bar = ProgressBar::hidden();
    let result = upscaler.upscale_with_progress(&image, scale, &mut |done, total| {
        if bar.is_hidden() && total > 1 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(total as u64);
            if let Ok(style) = ProgressStyle::with_template("tiles {bar:30} {pos}/{len} {elapsed}")
            {
                bar.set_style(style);
            }
        }
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let upscaled = result?;
    let format = match ext.as_deref() {
        Some("png") => ImageFormat::Png,
        _ => ImageFormat::Jpeg,
    };
    let bytes = format.encode(&upscaled, None)?;
    if !write_new(&args.output, &bytes)
        .with_context(|| format!("writing {}", args.output.display()))?
    {
        bail!(
            "{} appeared while upscaling; not overwriting it",
            args.output.display()
        );
    }
    eprintln!(
        "wrote {} ({}x{}, {}x with {}) in {:.1} s",
        args.output.display(),
        upscaled.width(),
        upscaled.height(),
        scale,
        upscaler.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
