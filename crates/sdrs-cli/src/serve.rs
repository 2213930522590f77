//! `sdrs serve`: the A1111-compatible HTTP API, the job queue and the web page.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use sdrs_server::{parse_auth, Limits, ServerConfig};

use crate::txt2img::network_options;

/// Arguments of `sdrs serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// The checkpoint loaded at start (else the first one in --models-dir).
    #[arg(long, alias = "ckpt")]
    model: Option<PathBuf>,
    /// A folder of checkpoints that clients can switch to (`sd_model_checkpoint`).
    #[arg(long = "models-dir", alias = "ckpt-dir")]
    models_dir: Option<PathBuf>,
    /// Address and port to listen on. The default answers this machine only; listening on
    /// another address (0.0.0.0 for every interface) has to be asked for.
    #[arg(long, default_value = "127.0.0.1:7860")]
    listen: SocketAddr,
    /// Require HTTP basic authentication: user:password, several separated by commas.
    #[arg(long = "api-auth")]
    api_auth: Option<String>,
    /// Where images are saved (txt2img-samples/ and img2img-samples/ below it), whatever
    /// happens to the client that asked for them.
    #[arg(long, default_value = "outputs")]
    outdir: PathBuf,
    /// Keep only the network in use resident, weights in half precision (see txt2img).
    #[arg(long)]
    lowmem: bool,
    /// bf16 products on AVX512-BF16 CPUs (see txt2img); recorded in each image's infotext.
    #[arg(long)]
    fast: bool,
    /// Largest request body, in MiB.
    #[arg(long = "max-body-mib", default_value_t = Limits::default().max_body_bytes >> 20)]
    max_body_mib: usize,
    /// Jobs that may wait behind the running one; more are answered 503 with Retry-After.
    #[arg(long = "max-queue", default_value_t = Limits::default().max_queue)]
    max_queue: usize,
    /// Largest width × height × images of one request.
    #[arg(long = "max-pixels", default_value_t = Limits::default().max_pixels)]
    max_pixels: usize,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let auth = match &args.api_auth {
        Some(text) => parse_auth(text).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let device = candle_core::Device::Cpu;
    let config = ServerConfig {
        network: network_options(args.lowmem, args.fast, &device),
        model: args.model,
        models_dir: args.models_dir,
        listen: args.listen,
        auth,
        outdir: args.outdir,
        device,
        limits: Limits {
            max_body_bytes: args.max_body_mib << 20,
            max_queue: args.max_queue,
            max_pixels: args.max_pixels,
            ..Limits::default()
        },
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(sdrs_server::serve(config))
}
