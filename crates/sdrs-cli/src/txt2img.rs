//! `sdrs txt2img`: CompVis' command line, A1111's samplers; and the flags and run loop that
//! `sdrs img2img` shares with it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use sdrs::hub::{Hub, ModelDefaults};
use sdrs::models::unet::Prediction;
use sdrs::output::ImageFormat;
use sdrs::pipeline::{
    txt2img, Event, Generation, GenerationRequest, LoadOptions, NetworkOptions, Outcome, Residency,
    StableDiffusion, TilingMode, VaeTiling,
};
use sdrs::prompt::{EditTimeline, PromptSyntax};
use sdrs::sampling::rng::{NormalVariant, RandnSource};
use sdrs::sampling::{Flow, Sampler, SigmaSchedule};
use sdrs::upscale::BuiltinUpscaler;
use sdrs::weights::Checkpoint;

use crate::download::resolve_model;
use crate::progress::Progress;
use crate::saver::Saver;

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    Full,
    Autocast,
}

#[derive(Clone, Copy, ValueEnum)]
enum VaeTilingArg {
    /// Tile images larger than 512² pixels.
    Auto,
    /// Tile any image larger than one 512² tile.
    Always,
    /// Decode and encode whole images (needs much memory for large ones).
    Never,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Png,
    Jpg,
}

impl Format {
    fn image_format(self) -> ImageFormat {
        match self {
            Format::Png => ImageFormat::Png,
            Format::Jpg => ImageFormat::Jpeg,
        }
    }
}

/// Arguments of `sdrs txt2img`.
#[derive(Args)]
pub struct Txt2ImgArgs {
    #[command(flatten)]
    common: GenerationArgs,
    /// Hires fix: sample at --W x --H, enlarge by this factor, and redraw at the larger size.
    #[arg(long = "hires-scale")]
    hires_scale: Option<f64>,
    /// Hires fix: steps of the second pass [default: --steps].
    #[arg(long = "hires-steps")]
    hires_steps: Option<usize>,
    /// Hires fix: how much the second pass redraws (A1111's denoising strength).
    #[arg(long = "hires-strength", default_value_t = 0.7)]
    hires_strength: f64,
    #[arg(long = "hires-upscaler", default_value = "Latent", help = hires_upscaler_help())]
    hires_upscaler: String,
}

/// `--hires-upscaler`'s help, naming the built-in upscalers from the library's list.
fn hires_upscaler_help() -> String {
    format!(
        "Hires fix upscaler: {}, or an ESRGAN model file",
        BuiltinUpscaler::names().join(", ")
    )
}

/// `--schedule`'s help, naming the schedules from the library's list.
fn schedule_help() -> String {
    let names: Vec<&str> = SigmaSchedule::all().iter().map(|s| s.name()).collect();
    format!(
        "Sigma schedule for the k-diffusion samplers: {} [default: the model's; normal, SD-Turbo \
         sgm_uniform]",
        names.join(", ")
    )
}

/// The flags txt2img and img2img share; the CompVis/optimizedSD spellings are accepted as
/// aliases.
#[derive(Args)]
pub struct GenerationArgs {
    /// The checkpoint: a .safetensors/.ckpt file, a diffusers folder, or a name from
    /// `sdrs models list` (downloaded on first use) [default: $SDRS_DEFAULT_MODEL, else sd-turbo].
    #[arg(long, alias = "ckpt")]
    model: Option<String>,
    /// Where `<lora:NAME:…>` in a prompt finds NAME [default: `loras/` beside the model
    /// folder].
    #[arg(long = "lora-dir")]
    lora_dir: Option<PathBuf>,
    /// A separate VAE file to use instead of the checkpoint's.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// What to draw.
    #[arg(long, default_value = "")]
    prompt: String,
    /// What to steer away from.
    #[arg(long, alias = "negative_prompt", default_value = "")]
    negative_prompt: String,
    /// Image height in pixels, a multiple of 8 [default: the model's, 512 for most; img2img: the
    /// init image's].
    #[arg(long = "H", visible_alias = "height")]
    pub height: Option<usize>,
    /// Image width in pixels, a multiple of 8 [default: the model's, 512 for most; img2img: the
    /// init image's].
    #[arg(long = "W", visible_alias = "width")]
    pub width: Option<usize>,
    /// Seed of the first image; −1 picks one. Image i uses seed + i.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    seed: i64,
    /// Number of batches.
    #[arg(long = "n-iter", alias = "n_iter", default_value_t = 1)]
    n_iter: usize,
    /// Images per batch.
    #[arg(long = "n-samples", alias = "n_samples", default_value_t = 1)]
    n_samples: usize,
    /// Sampling steps [default: the model's; 50, SD-Turbo 1].
    #[arg(long = "steps", visible_aliases = ["ddim-steps", "ddim_steps"])]
    steps: Option<usize>,
    /// Classifier-free guidance scale, 1 or less turns guidance off [default: the model's; 7.5,
    /// SD-Turbo 1].
    #[arg(long = "scale", visible_aliases = ["cfg-scale", "cfg_scale"])]
    scale: Option<f64>,
    #[arg(long, help = sampler_help())]
    sampler: Option<String>,
    #[arg(long, help = schedule_help())]
    schedule: Option<SigmaSchedule>,
    /// η, the share of fresh noise per step, for DDIM and "Euler a" [default: the sampler's;
    /// DDIM 0 (deterministic), Euler a 1].
    #[arg(long = "ddim-eta", visible_aliases = ["ddim_eta", "eta"])]
    eta: Option<f64>,
    /// The scale of "Euler a"'s fresh noise (k-diffusion's s_noise).
    #[arg(long = "s-noise", default_value_t = 1.0)]
    s_noise: f64,
    /// Use the text encoder's n-th layer from the end (1 = last).
    #[arg(long = "clip-skip", alias = "clip_skip", default_value_t = 1)]
    clip_skip: usize,
    /// How to read the prompt: auto (A1111 and optimizedSD's `text:weight`), a1111, optimized, plain.
    #[arg(long = "prompt-syntax", default_value = "auto")]
    prompt_syntax: PromptSyntax,
    /// How `when` in [from:to:when] is read: current (A1111 ≥ 1.6: 1.0 is a fraction of the
    /// steps, 1 a step) or old (below 1 a fraction, else a step).
    #[arg(long = "edit-timeline", default_value = "current")]
    edit_timeline: EditTimeline,
    /// Where the noise comes from: cpu (torch's CPU generator) or nv (torch's CUDA generator,
    /// A1111's default "GPU" noise, on any device).
    #[arg(long = "rng", default_value = "cpu")]
    rng: RandnSource,
    /// Float math for the torch-compatible CPU noise: avx2 (torch on x86-64) or scalar.
    #[arg(long = "rng-math", default_value = "avx2")]
    rng_math: NormalVariant,
    /// Output folder [default: outputs/txt2img-samples or outputs/img2img-samples].
    #[arg(long, visible_alias = "out")]
    outdir: Option<PathBuf>,
    /// File format of the images.
    #[arg(long, value_enum, default_value = "png")]
    format: Format,
    /// Do not write a grid of the run's images.
    #[arg(long = "skip-grid", alias = "skip_grid")]
    skip_grid: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Accepted for CompVis compatibility; the CPU computes in float32 either way.
    #[arg(long, value_enum, default_value = "autocast")]
    precision: Precision,
    /// Accepted for optimizedSD compatibility: the default mode is already the fast one.
    #[arg(long)]
    turbo: bool,
    /// What the UNet predicts, eps or v, overriding detection (a diffusers folder's scheduler
    /// config; for single files A1111's sidecar .yaml or a "768-v"/"v-pred" name, else eps).
    #[arg(long)]
    prediction: Option<Prediction>,
    /// When the VAE works in overlapping tiles, which bounds memory for large images.
    #[arg(long = "vae-tiling", value_enum, default_value = "auto")]
    vae_tiling: VaeTilingArg,
    /// Keep only the network in use in memory (text encoder, then UNet, then VAE), the UNet's
    /// and VAE's weights in half precision: optimizedSD's trade of some load time for memory.
    #[arg(long)]
    lowmem: bool,
    /// The UNet's and VAE's products in bf16 (AVX512-BF16 CPUs): about twice the speed of
    /// the exact f32 mode, at a small measured cost in exactness; recorded in the infotext.
    #[arg(long)]
    fast: bool,
    /// Save images whose latent or pixels hold NaN or infinite values instead of failing them
    /// (such images come out black).
    #[arg(long = "no-nan-check")]
    no_nan_check: bool,
    /// A folder of textual-inversion embeddings (.pt, .bin, .safetensors) whose file names
    /// prompts can use; default: `embeddings/` beside the model folder, when it exists.
    #[arg(long = "embeddings-dir", value_name = "DIR")]
    embeddings_dir: Option<PathBuf>,
}

impl GenerationArgs {
    /// The output folder given on the command line.
    pub fn outdir(&self) -> Option<PathBuf> {
        self.outdir.clone()
    }

    /// The device the flags ask for.
    pub fn device(&self) -> Result<candle_core::Device> {
        device(self.device)
    }

    /// The settings the named model is made for; knowing them needs no download.
    pub fn model_defaults(&self, hub: &Hub) -> ModelDefaults {
        hub.defaults(self.model.as_deref())
    }

    /// Width and height from the flags, else the model's size.
    pub fn size(&self, defaults: &ModelDefaults) -> (usize, usize) {
        (
            self.width.unwrap_or(defaults.size),
            self.height.unwrap_or(defaults.size),
        )
    }

    /// Loads the checkpoint (and separate VAE) the flags name, with their VAE tiling; a
    /// catalogue model missing from the Hub cache is downloaded first.
    pub fn load_model(&self, hub: &Hub, device: &candle_core::Device) -> Result<StableDiffusion> {
        let resolved = resolve_model(hub, self.model.as_deref())?;
        let path = &resolved.path;
        let mut checkpoint = Checkpoint::open(path)
            .with_context(|| format!("loading checkpoint {}", path.display()))?;
        if let Some(vae) = &self.vae {
            checkpoint
                .set_vae_file(vae)
                .with_context(|| format!("loading VAE {}", vae.display()))?;
        }
        let options = LoadOptions {
            networks: network_options(self.lowmem, self.fast, device),
            prediction: self.prediction,
            vae_tiling: VaeTiling {
                mode: match self.vae_tiling {
                    VaeTilingArg::Auto => TilingMode::Auto,
                    VaeTilingArg::Always => TilingMode::Always,
                    VaeTilingArg::Never => TilingMode::Never,
                },
                ..VaeTiling::default()
            },
            nan_check: !self.no_nan_check,
            // A Hub snapshot folder is named by its commit; the short name says more.
            name: resolved.entry.map(|entry| entry.name.to_string()),
            lora_dir: Some(
                self.lora_dir
                    .clone()
                    .unwrap_or_else(|| sdrs::addon_dir(&hub.model_dir, "loras")),
            ),
            embeddings_dir: self.embeddings_dir.clone().or_else(|| {
                Some(sdrs::addon_dir(&hub.model_dir, "embeddings")).filter(|d| d.is_dir())
            }),
        };
        // The models own their weights once built; dropping the checkpoint unmaps the file.
        StableDiffusion::load_with(&checkpoint, device, options)
            .with_context(|| format!("loading checkpoint {}", path.display()))
    }
}

fn device(arg: DeviceArg) -> Result<candle_core::Device> {
    match arg {
        DeviceArg::Cpu => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceArg::Cuda => Ok(candle_core::Device::new_cuda(0)?),
        #[cfg(not(feature = "cuda"))]
        DeviceArg::Cuda => {
            bail!("this sdrs was built without CUDA support; rebuild with `--features cuda`")
        }
    }
}

pub fn run(args: Txt2ImgArgs) -> Result<()> {
    let hub = Hub::from_env();
    let defaults = args.common.model_defaults(&hub);
    let mut request = args.common.request(&defaults);
    (request.width, request.height) = args.common.size(&defaults);
    if let Some(scale) = args.hires_scale {
        request.enable_hr = true;
        request.hr_scale = scale;
        request.hr_second_pass_steps = args.hires_steps.unwrap_or(0);
        request.denoising_strength = args.hires_strength;
        request.hr_upscaler = args.hires_upscaler.clone();
    } else if args.hires_steps.is_some() {
        bail!("--hires-steps needs --hires-scale");
    }
    execute(
        &args.common,
        &hub,
        request,
        "outputs/txt2img-samples",
        |sd, gen, on_event| txt2img(sd, gen, on_event),
    )
}

/// The `--sampler` help, from the library's sampler table.
fn sampler_help() -> String {
    format!(
        "Sampler, by A1111 name: {} [default: the model's; PLMS, SD-Turbo \"Euler a\"]",
        Sampler::help()
    )
}

impl GenerationArgs {
    /// The request these flags describe, the model's settings where they are silent; the
    /// caller sets the size and img2img's fields.
    pub fn request(&self, defaults: &ModelDefaults) -> GenerationRequest {
        GenerationRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps.unwrap_or(defaults.steps),
            cfg_scale: self.scale.unwrap_or(defaults.cfg_scale),
            sampler_name: self.sampler.clone().unwrap_or(defaults.sampler.into()),
            scheduler: self.schedule.unwrap_or(defaults.schedule),
            seed: self.seed,
            batch_size: self.n_samples,
            n_iter: self.n_iter,
            eta: self.eta,
            s_noise: self.s_noise,
            clip_skip: self.clip_skip,
            prompt_syntax: self.prompt_syntax,
            edit_timeline: self.edit_timeline,
            randn_source: self.rng,
            rng_math: self.rng_math,
            ..Default::default()
        }
    }
}

/// Validates `request`, loads the model, runs `generate` with a progress bar, and writes
/// every image as it is done (then a grid).
pub fn execute(
    args: &GenerationArgs,
    hub: &Hub,
    request: GenerationRequest,
    default_outdir: &str,
    generate: impl FnOnce(
        &StableDiffusion,
        &Generation,
        &mut dyn FnMut(Event) -> Flow,
    ) -> sdrs::Result<Outcome>,
) -> Result<()> {
    let _ = (args.precision, args.turbo);
    let gen = request.validate()?;
    let seed = gen.request().seed;
    if args.seed == -1 {
        eprintln!("seed: {seed}");
    }
    let device = args.device()?;
    let outdir = args
        .outdir
        .clone()
        .unwrap_or_else(|| PathBuf::from(default_outdir));
    let mut saver = Saver::prepare(&outdir, args.format.image_format())?;

    let started = Instant::now();
    let sd = args.load_model(hub, &device)?;
    let load_time = started.elapsed();

    let mut progress = Progress::start();
    let outcome = generate(&sd, &gen, &mut |event| match event {
        Event::Step {
            image,
            images,
            step,
            steps,
            ..
        } => {
            progress.step(image, images, step, steps);
            Flow::Continue
        }
        Event::Image { image, .. } => {
            progress.image_done();
            if saver.save(image) {
                Flow::Continue
            } else {
                Flow::Stop
            }
        }
    });
    if let Some(e) = saver.take_error() {
        return Err(e);
    }
    let outcome = outcome?;
    let written = saver.finish(args.n_samples, args.skip_grid)?;
    for path in &written {
        println!("{}", path.display());
    }
    eprintln!(
        "{}",
        progress.summary(outcome.images.len(), started.elapsed(), load_time, seed)
    );
    if outcome.images.is_empty() {
        bail!("no image was generated");
    }
    Ok(())
}

/// The networks' options for `--lowmem` and `--fast`, saying on stderr when this machine
/// cannot run the fast mode and the exact kernels run instead.
pub fn network_options(lowmem: bool, fast: bool, device: &candle_core::Device) -> NetworkOptions {
    let fast_here = sdrs::models::ModelOptions {
        half_weights: false,
        fast,
    }
    .fast_on(device);
    if fast && !fast_here {
        eprintln!("--fast needs a CPU with AVX512-BF16; running the exact f32 kernels instead");
    }
    NetworkOptions {
        residency: if lowmem {
            Residency::OneAtATime
        } else {
            Residency::All
        },
        fast,
    }
}
