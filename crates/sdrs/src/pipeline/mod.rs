//! Turning a request into images: the request and the `Generation` it validates into, the
//! loaded model and its networks, the loop every run shares, txt2img, img2img, the hires fix
//! and hd.

mod conditioning;
mod denoiser;
/// FLOP counts of each phase, for `sdrs bench`'s throughput figures; not an API.
#[doc(hidden)]
pub mod flops;
mod generate;
mod generation;
mod hd;
mod hires;
mod img2img;
pub mod infotext;
mod latent;
mod model;
mod networks;
mod request;
mod tiles;
mod txt2img;
pub mod vae_tiling;

pub use conditioning::{Conditioning, EncodedPart, SizeIds, UnetCondition};
pub use denoiser::CfgDenoiser;
pub use generate::{Event, GeneratedImage, Outcome};
pub use generation::{signed_seed, Generation};
pub use hd::{final_size, hd, tile_seed, HdEvent, HdOptions};
pub use img2img::{img2img, img2img_sigmas};
pub use latent::decode;
pub use model::{LoadOptions, StableDiffusion};
pub use networks::{NetworkOptions, Residency};
pub use request::GenerationRequest;
pub use txt2img::txt2img;
pub use vae_tiling::{TilingMode, VaeTiling};
