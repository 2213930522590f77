//! Turning a request into images: the request type, the loaded model, txt2img and img2img.

mod conditioning;
mod denoiser;
/// FLOP counts of each phase, for `sdrs bench`'s throughput figures; not an API.
#[doc(hidden)]
pub mod flops;
mod generate;
pub mod hd;
pub mod hires;
mod img2img;
pub mod infotext;
mod latent;
mod model;
mod networks;
mod request;
mod tiles;
mod txt2img;
pub mod vae_tiling;

pub use conditioning::{Conditioning, EncodedPart};
pub use denoiser::CfgDenoiser;
pub use generate::{Event, GeneratedImage, Outcome};
pub use img2img::{img2img, img2img_sigmas};
pub use latent::decode;
pub use model::{LoadOptions, StableDiffusion};
pub use networks::{NetworkOptions, Residency};
pub use request::{Generation, GenerationRequest};
pub use txt2img::txt2img;
pub use vae_tiling::{TilingMode, VaeTiling};
