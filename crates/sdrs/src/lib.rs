//! sdrs: Stable Diffusion in Rust — tokenizer, models, samplers and pipelines.

pub mod error;
pub mod hub;
pub mod image_io;
pub mod limits;
pub mod models;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod prompt;
pub mod sampling;
pub mod tokenizer;
pub mod upscale;
pub mod weights;

pub use error::{Error, Result};
