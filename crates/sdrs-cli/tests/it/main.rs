//! The `sdrs` binary's end-to-end tests, all in one test binary so that they link once: a
//! module per area. Pick an area with a filter: `cargo test -p sdrs-cli --test it serve::`.

mod cli;
mod hostile;
mod models;
mod serve;
mod upscale;
