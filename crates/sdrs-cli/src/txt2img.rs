//! `sdrs txt2img`: CompVis' command line, A1111's samplers; and the flags and run loop that
//! `sdrs img2img` shares with it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sdrs::hub::{Hub, ModelDefaults};
use sdrs::image_io::{encode_jpeg, encode_png, grid};
use sdrs::models::unet::Prediction;
use sdrs::output::OutputDir;
use sdrs::pipeline::{
    resolve_seed, txt2img, Event, GeneratedImage, GenerationRequest, NetworkOptions, Residency,
    StableDiffusion, TilingMode,
};
use sdrs::prompt::PromptSyntax;
use sdrs::sampling::rng::NormalVariant;
use sdrs::sampling::{Flow, SigmaSchedule};
use sdrs::upscale::BuiltinUpscaler;
use sdrs::weights::Checkpoint;

use crate::download::resolve_model;
use crate::timing::PhaseClock;

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
    /// Sampler, by A1111 name: DDIM, PLMS, Euler, "Euler a", Heun, "DPM++ 2M" (add " Karras")
    /// [default: the model's; PLMS, SD-Turbo "Euler a"].
    #[arg(long)]
    sampler: Option<String>,
    #[arg(long, help = schedule_help())]
    schedule: Option<SigmaSchedule>,
    /// DDIM's η (0 = deterministic).
    #[arg(long = "ddim-eta", visible_aliases = ["ddim_eta", "eta"], default_value_t = 0.0)]
    eta: f64,
    /// Use the text encoder's n-th layer from the end (1 = last).
    #[arg(long = "clip-skip", alias = "clip_skip", default_value_t = 1)]
    clip_skip: usize,
    /// How to read the prompt: auto (A1111 and optimizedSD's `text:weight`), a1111, optimized, plain.
    #[arg(long = "prompt-syntax", default_value = "auto")]
    prompt_syntax: PromptSyntax,
    /// Float math for the torch-compatible noise: avx2 (torch on x86-64) or scalar.
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
    pub fn model_defaults(&self) -> ModelDefaults {
        Hub::from_env().defaults(self.model.as_deref())
    }

    /// Width and height from the flags, else the model's size.
    pub fn size(&self) -> (usize, usize) {
        let side = self.model_defaults().size;
        (self.width.unwrap_or(side), self.height.unwrap_or(side))
    }

    /// Loads the checkpoint (and separate VAE) the flags name, with their VAE tiling; a
    /// catalogue model missing from the Hub cache is downloaded first.
    pub fn load_model(&self, device: &candle_core::Device) -> Result<StableDiffusion> {
        let resolved = resolve_model(&Hub::from_env(), self.model.as_deref())?;
        let path = &resolved.path;
        let mut checkpoint = Checkpoint::open(path)
            .with_context(|| format!("loading checkpoint {}", path.display()))?;
        if let Some(vae) = &self.vae {
            checkpoint
                .set_vae_file(vae)
                .with_context(|| format!("loading VAE {}", vae.display()))?;
        }
        let options = network_options(self.lowmem, self.fast, device);
        let mut sd = StableDiffusion::load_with(&checkpoint, device, options)
            .with_context(|| format!("loading checkpoint {}", path.display()))?;
        if let Some(entry) = resolved.entry {
            // A Hub snapshot folder is named by its commit; the short name says more.
            sd.model_name = entry.name.to_string();
        }
        if let Some(prediction) = self.prediction {
            sd.prediction = prediction;
        }
        sd.nan_check = !self.no_nan_check;
        sd.vae_tiling.mode = match self.vae_tiling {
            VaeTilingArg::Auto => TilingMode::Auto,
            VaeTilingArg::Always => TilingMode::Always,
            VaeTilingArg::Never => TilingMode::Never,
        };
        // The models now own their weights; dropping the checkpoint unmaps the file.
        Ok(sd)
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
    let mut request = args.common.request();
    (request.width, request.height) = args.common.size();
    if let Some(scale) = args.hires_scale {
        request.enable_hr = true;
        request.hr_scale = scale;
        request.hr_second_pass_steps = args.hires_steps.unwrap_or(0);
        request.denoising_strength = args.hires_strength;
        request.hr_upscaler = args.hires_upscaler.clone();
    } else if args.hires_steps.is_some() {
        bail!("--hires-steps needs --hires-scale");
    }
    let args = args.common;
    execute(
        &args,
        request,
        "outputs/txt2img-samples",
        |sd, req, on_event| txt2img(sd, req, on_event),
    )
}

impl GenerationArgs {
    /// The request these flags describe, the model's settings where they are silent; the
    /// caller sets the size and img2img's fields.
    pub fn request(&self) -> GenerationRequest {
        let defaults = self.model_defaults();
        GenerationRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps.unwrap_or(defaults.steps),
            cfg_scale: self.scale.unwrap_or(defaults.cfg_scale),
            sampler_name: self.sampler.clone().unwrap_or(defaults.sampler.into()),
            scheduler: self.schedule.unwrap_or(defaults.schedule),
            seed: resolve_seed(self.seed) as i64,
            batch_size: self.n_samples,
            n_iter: self.n_iter,
            eta: self.eta,
            clip_skip: self.clip_skip,
            prompt_syntax: self.prompt_syntax,
            rng_math: self.rng_math,
            ..Default::default()
        }
    }
}

/// Validates `request`, loads the model, runs `generate` with a progress bar, and writes
/// every image as it is done (then a grid).
pub fn execute(
    args: &GenerationArgs,
    request: GenerationRequest,
    default_outdir: &str,
    generate: impl FnOnce(
        &StableDiffusion,
        &GenerationRequest,
        &mut dyn FnMut(Event) -> Flow,
    ) -> sdrs::Result<Vec<GeneratedImage>>,
) -> Result<()> {
    let _ = (args.precision, args.turbo);
    request.validate()?;
    if args.seed == -1 {
        eprintln!("seed: {}", request.seed);
    }
    let device = args.device()?;
    let outdir = args
        .outdir
        .clone()
        .unwrap_or_else(|| PathBuf::from(default_outdir));
    let mut out = OutputDir::prepare(&outdir)
        .with_context(|| format!("cannot use the output directory {}", outdir.display()))?;

    let started = Instant::now();
    let sd = args.load_model(&device)?;
    let load_time = started.elapsed();

    let ext = match args.format {
        Format::Png => "png",
        Format::Jpg => "jpg",
    };
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} steps {elapsed_precise} ({per_sec})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    let mut write_error = None;
    let mut written = Vec::new();
    let mut clock = PhaseClock::start();
    let result = generate(&sd, &request, &mut |event| {
        match event {
            Event::Step {
                image,
                images,
                step,
                steps,
                ..
            } => {
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(steps as u64).with_style(style.clone());
                    b.set_message(format!("image {}/{images}", image + 1));
                    b
                });
                b.set_length(steps as u64);
                b.set_position(step as u64);
                clock.step_done();
            }
            Event::Image { image, .. } => {
                clock.image_done();
                if let Some(b) = bar.take() {
                    b.finish();
                }
                let bytes = match args.format {
                    Format::Png => encode_png(&image.image, Some(&image.infotext)),
                    Format::Jpg => encode_jpeg(&image.image),
                };
                match bytes.and_then(|b| out.write_sample(image.seed, ext, &b)) {
                    Ok(path) => written.push((path, image.image.clone())),
                    Err(e) => {
                        write_error = Some(anyhow::Error::from(e));
                        return Flow::Stop;
                    }
                }
            }
        }
        Flow::Continue
    });
    if let Some(e) = write_error {
        return Err(e);
    }
    let images = result?;

    if !args.skip_grid && images.len() > 1 {
        let all: Vec<_> = written.iter().map(|(_, img)| img.clone()).collect();
        if let Some(g) = grid(&all, args.n_samples) {
            let bytes = match args.format {
                Format::Png => encode_png(&g, None)?,
                Format::Jpg => encode_jpeg(&g)?,
            };
            let path = out.write_grid(ext, &bytes)?;
            eprintln!("grid: {}", path.display());
        }
    }
    for (path, _) in &written {
        println!("{}", path.display());
    }
    eprintln!(
        "{} image(s) in {:.1}s: load {:.1}s, sampling {:.1}s ({:.2}s/step), decode {:.1}s, seed {}",
        images.len(),
        started.elapsed().as_secs_f64(),
        load_time.as_secs_f64(),
        clock.sampling.as_secs_f64(),
        clock.per_step(),
        clock.decoding.as_secs_f64(),
        request.seed,
    );
    if images.is_empty() {
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
