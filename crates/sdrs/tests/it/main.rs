//! The integration tests, all in one binary so that they link once: a module per area, and
//! the shared helpers in `common`. Pick an area with a filter: `cargo test -p sdrs --test it
//! txt2img::`.

mod common;

mod clip;
mod embeddings;
mod fast;
mod hd;
mod hostile_files;
mod hostile_loras;
mod hub;
mod img2img;
mod layers;
mod lora;
mod lowmem;
mod prompt;
mod prompt_pipeline;
mod rng;
mod schedules;
mod sd2;
mod sdxl;
mod tokenizer;
mod txt2img;
mod unet;
mod upscale;
mod vae;
mod vpred;
mod weights;
