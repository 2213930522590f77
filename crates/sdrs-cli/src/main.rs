//! `sdrs`: Stable Diffusion from the command line.

mod bench;
mod download;
mod hd;
mod img2img;
mod models;
mod progress;
mod saver;
mod serve;
mod threads;
mod timing;
mod tokenize;
mod txt2img;
mod upscale;

use clap::{Parser, Subcommand};

/// Stable Diffusion in Rust: one binary, real checkpoints, exact seeds.
#[derive(Parser)]
#[command(name = "sdrs", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a text prompt.
    Txt2img(Box<txt2img::Txt2ImgArgs>),
    /// Generate (or take) a picture, enlarge it and redraw it in tiles (txt2imghd).
    Hd(Box<hd::HdArgs>),
    /// Redraw a picture guided by a text prompt.
    Img2img(Box<img2img::Img2ImgArgs>),
    /// Show how a prompt is split into CLIP tokens (JSON).
    Tokenize(tokenize::TokenizeArgs),
    /// Enlarge a picture with an ESRGAN / Real-ESRGAN network, or Lanczos.
    Upscale(upscale::UpscaleArgs),
    /// Time each phase of a generation (text encode, UNet step, VAE decode, whole image).
    Bench(bench::BenchArgs),
    /// List, download or delete the well-known models (SD-Turbo, SD 1.5, SD 2.1).
    Models(models::ModelsArgs),
    /// Serve the A1111-compatible HTTP API, a job queue and a web page.
    Serve(Box<serve::ServeArgs>),
    /// The worker process `sdrs serve` starts: runs jobs on the model, speaking frames on
    /// stdin and stdout. Not for people.
    #[command(hide = true)]
    ServeWorker,
}

fn main() -> std::process::ExitCode {
    threads::use_physical_cores();
    sdrs::keep_freed_memory();
    // The library's warnings, on stderr as "warning: …" like the CLI's own.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing_subscriber::filter::LevelFilter::WARN)
        .without_time()
        .with_target(false)
        .with_level(true)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Txt2img(args) => txt2img::run(*args),
        Command::Hd(args) => hd::run(*args),
        Command::Img2img(args) => img2img::run(*args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Upscale(args) => upscale::run(args),
        Command::Models(args) => models::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::ServeWorker => sdrs_server::run_worker(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
