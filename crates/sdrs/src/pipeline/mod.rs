//! Turning a request into images: the request type, the loaded model, txt2img and img2img.

mod conditioning;
mod denoiser;
pub mod flops;
pub mod hd;
pub mod hires;
mod img2img;
pub mod infotext;
mod model;
mod networks;
mod request;
pub mod tiles;
mod txt2img;
pub mod vae_tiling;

pub use conditioning::{Conditioning, EncodedPart};
pub use denoiser::CfgDenoiser;
pub use img2img::{img2img, img2img_sigmas};
pub use model::StableDiffusion;
pub use networks::{NetworkOptions, Residency};
pub use request::{GenerationRequest, ResolvedSampling};
pub use txt2img::{decode, resolve_seed, txt2img, Event, GeneratedImage};
pub use vae_tiling::{TilingMode, VaeTiling};
