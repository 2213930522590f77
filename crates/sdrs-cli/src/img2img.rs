//! `sdrs img2img`: the txt2img flags plus CompVis' `--init-img` and `--strength`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use sdrs::hub::Hub;
use sdrs::image_io::{load_image, ResizeMode};
use sdrs::pipeline::img2img;

use crate::txt2img::{execute, GenerationArgs};

/// Arguments of `sdrs img2img`.
#[derive(Args)]
pub struct Img2ImgArgs {
    #[command(flatten)]
    common: GenerationArgs,
    /// The picture to start from: PNG, JPEG or WebP (transparency is flattened onto white).
    #[arg(long = "init-img", alias = "init_img")]
    init_img: PathBuf,
    /// How much of the picture is redrawn: 0 keeps it, 1 replaces it entirely.
    #[arg(
        long,
        visible_aliases = ["denoising-strength", "denoising_strength"],
        default_value_t = 0.75,
        allow_negative_numbers = true
    )]
    strength: f64,
    /// How the picture is fitted to --W/--H: just-resize (stretch), crop (cover, cut the
    /// overhang) or fill (fit, stretch the edges into the borders). A1111's 0, 1, 2.
    #[arg(
        long = "resize-mode",
        alias = "resize_mode",
        default_value = "just-resize"
    )]
    resize_mode: ResizeMode,
}

pub fn run(args: Img2ImgArgs) -> Result<()> {
    let init = load_image(&args.init_img).context("reading the init image")?;
    // Without --W/--H the output keeps the picture's size, rounded down to a multiple of 8
    // (the picture is resized to it, as diffusers does).
    let round = |v: u32| (v as usize) / 8 * 8;
    let (width, height) = (
        args.common.width.unwrap_or(round(init.width())),
        args.common.height.unwrap_or(round(init.height())),
    );
    if width == 0 || height == 0 {
        bail!(
            "the init image is {}x{} pixels; it needs at least 8 pixels a side",
            init.width(),
            init.height()
        );
    }
    let hub = Hub::from_env();
    let mut request = args.common.request(&args.common.model_defaults(&hub));
    request.width = width;
    request.height = height;
    request.denoising_strength = args.strength;
    request.resize_mode = args.resize_mode;
    execute(
        &args.common,
        &hub,
        request,
        "outputs/img2img-samples",
        |sd, req, on_event| img2img(sd, req, &init, on_event),
    )
}
