//! The networks as candle modules: weights in through a `VarBuilder` (diffusers names), tensors out.

pub mod clip;
pub mod esrgan;
pub mod layers;
pub mod unet;
pub mod vae;

pub use layers::ModelOptions;
