//! Turning a request into images: the request type, the loaded model, txt2img and img2img.

mod conditioning;
mod denoiser;
mod img2img;
pub mod infotext;
mod model;
mod request;
mod txt2img;

pub use conditioning::{Conditioning, EncodedPart};
pub use denoiser::CfgDenoiser;
pub use img2img::{img2img, img2img_sigmas};
pub use model::StableDiffusion;
pub use request::{GenerationRequest, ResolvedSampling, MAX_PIXELS, MAX_SIDE};
pub use txt2img::{decode, resolve_seed, txt2img, Event, GeneratedImage};
