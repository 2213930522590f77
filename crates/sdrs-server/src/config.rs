//! How a server is set up: where it listens, who may call it, and how much it accepts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use sdrs::pipeline::NetworkOptions;

use crate::process::WorkerCommand;

/// Everything `sdrs serve` is told on its command line.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model loaded at start.
    pub model: Option<PathBuf>,
    /// More models that `sd_model_checkpoint` can switch to.
    pub models_dir: Option<PathBuf>,
    /// The LoRA folder (`--lora-dir`); none: `loras/` beside the models (see
    /// [`ServerConfig::lora_dir`]).
    pub lora_dir: Option<PathBuf>,
    /// The embeddings folder (`--embeddings-dir`); none: `embeddings/` beside the models.
    pub embeddings_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// `user:password` pairs for HTTP basic authentication; empty = no authentication.
    pub auth: Vec<(String, String)>,
    /// Where finished images are saved (`txt2img-samples/`, `img2img-samples/` below it).
    pub outdir: PathBuf,
    pub device: Device,
    pub network: NetworkOptions,
    /// Whether images with NaN or infinite values fail (`--no-nan-check` turns it off).
    pub nan_check: bool,
    pub limits: Limits,
    /// How to start the worker process that owns the model and runs the jobs.
    pub worker: WorkerCommand,
    /// Host names the `Host` header may carry besides IP literals and loopback names
    /// (`--allowed-hosts`); `*` allows any.
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may call the API (`--cors-allow-origins`), answered with CORS
    /// headers; `*` allows any. Other cross-origin requests are refused.
    pub cors_allow_origins: Vec<String>,
}

impl ServerConfig {
    /// The folder `<lora:NAME>` finds `NAME` in: `--lora-dir`, else `loras/` beside the
    /// models.
    pub fn lora_dir(&self) -> Option<PathBuf> {
        self.lora_dir
            .clone()
            .or_else(|| beside_models(self.model.as_deref(), self.models_dir.as_deref(), "loras"))
    }

    /// The folder of textual-inversion embeddings: `--embeddings-dir`, else `embeddings/`
    /// beside the models.
    pub fn embeddings_dir(&self) -> Option<PathBuf> {
        self.embeddings_dir.clone().or_else(|| {
            beside_models(
                self.model.as_deref(),
                self.models_dir.as_deref(),
                "embeddings",
            )
        })
    }
}

/// `folder` beside the model folder (see [`sdrs::addon_dir`]): the model folder is
/// `--models-dir` when one is given, else the folder that holds the `--model` file or
/// diffusers folder.
fn beside_models(model: Option<&Path>, models_dir: Option<&Path>, folder: &str) -> Option<PathBuf> {
    let models = match models_dir {
        Some(dir) => dir,
        None => model?.parent()?,
    };
    let models = if models.as_os_str().is_empty() {
        Path::new(".")
    } else {
        models
    };
    Some(sdrs::addon_dir(models, folder))
}

/// What one client can ask of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body (JSON with base64 images), in bytes.
    pub max_body_bytes: usize,
    /// Jobs that may wait behind the running one; more are refused with 503.
    pub max_queue: usize,
    /// Largest width × height × images of one request.
    pub max_pixels: usize,
    /// Finished jobs (and their images) kept in memory for `GET /sdrs/v1/jobs/{id}`.
    pub keep_finished: usize,
    /// Longest prompt or negative prompt, in bytes (at most the library's
    /// `MAX_PROMPT_BYTES`).
    pub max_prompt_bytes: usize,
    /// Time a client has to send a request's headers; a connection that stops mid-header
    /// is closed.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in; after it the
    /// request is answered 408 and the connection closed.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 << 20,
            max_queue: 256,
            // Sixteen 1024² images, or one 4096² image, per request.
            max_pixels: 4096 * 4096,
            keep_finished: 200,
            max_prompt_bytes: sdrs::limits::MAX_PROMPT_BYTES,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// Splits a comma-separated flag value (`--allowed-hosts`, `--cors-allow-origins`).
pub fn parse_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(|item| item.trim().trim_end_matches('/').to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

/// Parses `--api-auth`: `user:password`, several separated by commas (A1111's format).
pub fn parse_auth(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(|pair| {
            pair.trim()
                .split_once(':')
                .filter(|(user, _)| !user.is_empty())
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .ok_or_else(|| format!("--api-auth wants user:password, got {pair:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_pairs_are_split_at_the_first_colon() {
        assert_eq!(
            parse_auth("a:b,c:d:e").unwrap(),
            [("a".into(), "b".into()), ("c".into(), "d:e".into())]
        );
        assert!(parse_auth("nocolon").is_err());
        assert!(parse_auth(":pass").is_err());
    }

    #[test]
    fn addon_folders_sit_beside_the_model_folder() {
        let dir = Path::new("/srv/models");
        let model = Path::new("/a/b/model.safetensors");
        let diffusers = Path::new("/a/b/folder-model");
        let got = |m: Option<&Path>, d| beside_models(m, d, "loras");
        assert_eq!(got(Some(model), Some(dir)), Some("/srv/loras".into()));
        assert_eq!(got(Some(model), None), Some("/a/loras".into()));
        assert_eq!(got(Some(diffusers), None), Some("/a/loras".into()));
        assert_eq!(got(Some(Path::new("x.ckpt")), None), Some("./loras".into()));
        assert_eq!(got(None, None), None);
    }
}
