//! sdrs: Stable Diffusion in Rust — tokenizer, models, samplers and pipelines.
//!
//! A run starts from a [`GenerationRequest`] (the fields A1111's API and infotexts use), which
//! [`GenerationRequest::validate`] turns into the [`Generation`] every pipeline takes:
//!
//! ```no_run
//! use sdrs::pipeline::{txt2img, GenerationRequest, StableDiffusion};
//! use sdrs::sampling::Flow;
//! use sdrs::weights::Checkpoint;
//!
//! # fn main() -> sdrs::Result<()> {
//! let checkpoint = Checkpoint::open("v1-5-pruned-emaonly.safetensors".as_ref())?;
//! let sd = StableDiffusion::load(&checkpoint, &candle_core::Device::Cpu)?;
//! let generation = GenerationRequest {
//!     prompt: "a lighthouse at dusk".into(),
//!     sampler_name: "DPM++ 2M Karras".into(),
//!     steps: 20,
//!     seed: 42,
//!     ..Default::default()
//! }
//! .validate()?;
//! let outcome = txt2img(&sd, &generation, &mut |_event| Flow::Continue)?;
//! outcome.images[0].image.save("lighthouse.png").ok();
//! # Ok(())
//! # }
//! ```
//!
//! The modules: [`weights`] opens checkpoints, [`models`] holds the networks, [`sampling`] the
//! samplers, schedules and seeded noise, [`prompt`] the prompt languages, [`pipeline`] the
//! runs (txt2img, img2img, hires fix, hd), [`upscale`] ESRGAN and Lanczos, [`hub`] the model
//! catalogue and downloads, [`output`] how images are saved, [`limits`] every outside bound.
#![warn(missing_docs)]

pub mod error;
pub mod hub;
pub mod image_io;
pub mod limits;
pub mod lora;
pub mod models;
/// The CPU kernels behind the models: public only for the crate's benchmarks, not an API.
#[doc(hidden)]
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod prompt;
pub mod sampling;
pub mod tokenizer;
pub mod upscale;
pub mod weights;

pub use error::{Error, Result};
pub use ops::bf16::available as fast_available;
pub use ops::keep_freed_memory;

/// The folder of add-on files (`loras`, `embeddings`) beside `model_folder`, A1111's layout:
/// `…/models` next to `…/loras` and `…/embeddings`.
pub fn addon_dir(model_folder: &std::path::Path, folder: &str) -> std::path::PathBuf {
    let parent = model_folder.parent().unwrap_or(std::path::Path::new(""));
    parent.join(folder)
}
pub use pipeline::{Generation, GenerationRequest};
