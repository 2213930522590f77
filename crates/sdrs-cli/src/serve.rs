//! `sdrs serve`: the A1111-compatible HTTP API, the job queue and the web page.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use sdrs_server::{parse_auth, parse_list, Limits, ServerConfig, WorkerCommand};

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
    /// The LoRA folder that `<lora:NAME:MULT>` in prompts finds NAME in [default: `loras/`
    /// beside the model folder: --models-dir, else the folder holding --model]; listed at
    /// /sdapi/v1/loras.
    #[arg(long = "lora-dir")]
    lora_dir: Option<PathBuf>,
    /// The textual-inversion embeddings prompts can name [default: `embeddings/` beside the
    /// model folder].
    #[arg(long = "embeddings-dir", value_name = "DIR")]
    embeddings_dir: Option<PathBuf>,
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
    /// Save images whose latent or pixels hold NaN or infinite values instead of failing them.
    #[arg(long = "no-nan-check")]
    no_nan_check: bool,
    /// Largest request body, in MiB.
    #[arg(long = "max-body-mib", default_value_t = Limits::default().max_body_bytes >> 20)]
    max_body_mib: usize,
    /// Jobs that may wait behind the running one; more are answered 503 with Retry-After.
    #[arg(long = "max-queue", default_value_t = Limits::default().max_queue)]
    max_queue: usize,
    /// Largest width × height × images of one request.
    #[arg(long = "max-pixels", default_value_t = Limits::default().max_pixels)]
    max_pixels: usize,
    /// Longest prompt (and negative prompt) in bytes; at most the default, 64 KiB.
    #[arg(long = "max-prompt-bytes", default_value_t = Limits::default().max_prompt_bytes)]
    max_prompt_bytes: usize,
    /// Host names the server answers to besides IP addresses and localhost, comma-separated
    /// (`*`: any). Other names are refused, which stops DNS-rebinding pages.
    #[arg(long = "allowed-hosts", value_delimiter = ',')]
    allowed_hosts: Vec<String>,
    /// Origins (`https://example.com`) whose pages may call the API, comma-separated (`*`:
    /// any). Requests from other sites' pages are refused.
    #[arg(long = "cors-allow-origins", value_delimiter = ',')]
    cors_allow_origins: Vec<String>,
    /// Seconds a client has to send a request's headers before the connection is closed.
    #[arg(long = "header-timeout", default_value_t = Limits::default().header_timeout.as_secs_f64())]
    header_timeout: f64,
    /// Seconds a client has to send a request's body before it is answered 408 and the
    /// connection closed.
    #[arg(long = "body-timeout", default_value_t = Limits::default().body_timeout.as_secs_f64())]
    body_timeout: f64,
}

/// A positive, finite number of seconds.
fn seconds(value: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero() && d.as_secs() <= 24 * 3600)
        .with_context(|| format!("{flag} wants seconds from above 0 to a day, got {value}"))
}

pub fn run(args: ServeArgs) -> Result<()> {
    let auth = match &args.api_auth {
        Some(text) => parse_auth(text).map_err(anyhow::Error::msg)?,
        None => Vec::new(),
    };
    let device = candle_core::Device::Cpu;
    let exe = std::env::current_exe().context("finding the sdrs binary to start workers")?;
    let config = ServerConfig {
        network: network_options(args.lowmem, args.fast, &device),
        nan_check: !args.no_nan_check,
        model: args.model,
        models_dir: args.models_dir,
        lora_dir: args.lora_dir,
        embeddings_dir: args.embeddings_dir,
        listen: args.listen,
        auth,
        outdir: args.outdir,
        device,
        limits: Limits {
            max_body_bytes: args.max_body_mib.saturating_mul(1 << 20),
            max_queue: args.max_queue,
            max_pixels: args.max_pixels,
            max_prompt_bytes: args.max_prompt_bytes,
            header_timeout: seconds(args.header_timeout, "--header-timeout")?,
            body_timeout: seconds(args.body_timeout, "--body-timeout")?,
            ..Limits::default()
        },
        worker: WorkerCommand::new(exe, &["serve-worker"]),
        allowed_hosts: parse_list(&args.allowed_hosts.join(",")),
        cors_allow_origins: parse_list(&args.cors_allow_origins.join(",")),
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(sdrs_server::serve(config))
}
