//! `sdrs serve`: A1111's HTTP API (`/sdapi/v1`) and sdrs' job API (`/sdrs/v1/jobs`) over
//! one FIFO queue, and the web page at `/`. The model lives in a worker process that a
//! supervisor thread feeds the queue's jobs and restarts when a job kills it; the HTTP side
//! never runs a job itself.

mod a1111;
mod auth;
mod body;
mod config;
mod error;
mod guard;
mod jobs;
mod listen;
mod loras;
mod models;
mod options;
mod preview;
mod process;
mod protocol;
mod queue;
mod request;
mod supervisor;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Result};
use axum::extract::Request;
use axum::response::Html;
use axum::routing::{get, post};
use axum::Router;
use sdrs::lora::LoraLibrary;
use serde_json::{Map, Value};

pub use config::{parse_auth, parse_list, Limits, ServerConfig};
pub use listen::serve;
pub use process::WorkerCommand;
pub use worker::{run_worker, TEST_CRASH_VAR};

/// The A1111 request parser on arbitrary bytes, for the fuzz target; not part of the API.
#[doc(hidden)]
pub use request::fuzz_parse as fuzz_a1111_request;

use auth::Caller;
use error::ApiError;
use models::ModelEntry;
use protocol::{DeviceSpec, ToWorker};
use queue::{Job, JobStatus, Queue, Work};
use supervisor::{CurrentModel, LoadedModel, Supervisor};

/// The page at `/`: plain HTML, CSS and JavaScript, embedded in the binary.
const PAGE: &str = include_str!("../web/index.html");

/// What every handler shares.
struct AppState {
    queue: Arc<Queue>,
    limits: Limits,
    model_arg: Option<PathBuf>,
    models_dir: Option<PathBuf>,
    models: Mutex<Vec<ModelEntry>>,
    current: CurrentModel,
    options: Mutex<Map<String, Value>>,
    /// The LoRA folder, as `/sdapi/v1/loras` lists it (the worker's model has its own).
    loras: LoraLibrary,
    /// The embeddings folder the worker loads with the models.
    embeddings_dir: Option<PathBuf>,
    /// Rescans of the LoRA and embeddings folders so far, which the supervisor passes on to
    /// the worker.
    addon_scans: Arc<AtomicU64>,
    /// Held while the LoRA folder is rescanned.
    lora_refresh: tokio::sync::Mutex<()>,
}

impl AppState {
    fn submit(&self, work: Work, caller: Caller) -> Result<Arc<Job>, ApiError> {
        self.queue.submit(work, caller.0).map_err(|full| {
            let mut e = ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the queue is full ({} jobs waiting); try again later",
                    full.pending
                ),
            );
            e.retry_after = Some(10);
            e
        })
    }

    /// Queues `work` and waits for it to end.
    async fn run_to_end(&self, work: Work, caller: Caller) -> Result<JobStatus, ApiError> {
        let job = self.submit(work, caller)?;
        let mut updates = job.subscribe();
        let status = updates
            .wait_for(|s| s.state.is_final())
            .await
            .map(|s| s.clone())
            .map_err(|_| {
                ApiError::new(
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "the server is shutting down",
                )
            })?;
        Ok(status)
    }

    fn current_model(&self) -> Option<LoadedModel> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn models(&self) -> Vec<ModelEntry> {
        self.models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn rescan_models(&self) {
        let found = models::list(self.model_arg.as_deref(), self.models_dir.as_deref());
        *self.models.lock().unwrap_or_else(PoisonError::into_inner) = found;
    }

    /// A route's JSON body, within the server's size and time limits.
    async fn read_body(&self, request: Request) -> Result<axum::body::Bytes, ApiError> {
        body::read_json(
            request,
            self.limits.max_body_bytes,
            self.limits.body_timeout,
        )
        .await
    }

    fn stored_options(&self) -> Map<String, Value> {
        self.options
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The stored options with the loaded model filled in.
    fn options(&self) -> Map<String, Value> {
        let mut options = self.stored_options();
        let current = self.current_model();
        options.insert(
            "sd_model_checkpoint".into(),
            current.as_ref().map(|m| m.entry.title.clone()).into(),
        );
        options.insert(
            "sd_checkpoint_hash".into(),
            current.and_then(|m| m.hash).into(),
        );
        options
    }

    fn store_options(&self, changes: Map<String, Value>) {
        self.options
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(changes);
    }
}

/// A server ready to answer: its routes, its state, and the supervisor of the worker process
/// behind them.
pub struct Server {
    pub router: Router,
    state: Arc<AppState>,
    supervisor: std::thread::JoinHandle<()>,
    worker_pid: Arc<AtomicU32>,
}

impl Server {
    /// Lists the models, starts the worker process and queues the first model's load
    /// (requests queue behind it, so the server answers at once).
    pub fn start(config: &ServerConfig) -> Result<Self> {
        let found = models::list(config.model.as_deref(), config.models_dir.as_deref());
        let first = match &config.model {
            Some(path) => {
                if !path.exists() {
                    bail!("--model {}: no such file or folder", path.display());
                }
                ModelEntry::from_path(path, config.models_dir.as_deref())
            }
            None => match found.first() {
                Some(entry) => entry.clone(),
                None => bail!(
                    "no model: give --model, or a --models-dir that holds checkpoints \
                     (.safetensors, .ckpt or diffusers folders)"
                ),
            },
        };
        if config.limits.max_prompt_bytes > sdrs::limits::MAX_PROMPT_BYTES {
            bail!(
                "--max-prompt-bytes {} is over the library's MAX_PROMPT_BYTES ({})",
                config.limits.max_prompt_bytes,
                sdrs::limits::MAX_PROMPT_BYTES
            );
        }
        let queue = Arc::new(Queue::new(
            config.limits.max_queue,
            config.limits.keep_finished,
        ));
        let current = CurrentModel::default();
        let worker_pid = Arc::new(AtomicU32::new(0));
        let lora_dir = config.lora_dir();
        let addon_scans = Arc::new(AtomicU64::new(0));
        let supervisor = Supervisor {
            queue: queue.clone(),
            command: config.worker.clone(),
            setup: ToWorker::Setup {
                device: device_spec(&config.device),
                lowmem: config.network.residency == sdrs::pipeline::Residency::OneAtATime,
                fast: config.network.fast,
                nan_check: config.nan_check,
                outdir: config.outdir.clone(),
                lora_dir: lora_dir.clone(),
                embeddings_dir: config.embeddings_dir(),
            },
            current: current.clone(),
            pid: worker_pid.clone(),
            addon_scans: addon_scans.clone(),
        }
        .spawn()?;
        // The first load counts against no client's queue space.
        queue
            .submit(Work::LoadModel { model: first }, None)
            .map_err(|_| anyhow::anyhow!("the queue refused the first model load"))?;
        let state = Arc::new(AppState {
            queue,
            limits: config.limits,
            model_arg: config.model.clone(),
            models_dir: config.models_dir.clone(),
            models: Mutex::new(found),
            current,
            options: Mutex::new(options::initial(&config.outdir)),
            loras: LoraLibrary::new(lora_dir),
            embeddings_dir: config.embeddings_dir(),
            addon_scans,
            lora_refresh: tokio::sync::Mutex::new(()),
        });
        let router = router(state.clone(), config);
        Ok(Self {
            router,
            state,
            supervisor,
            worker_pid,
        })
    }

    /// The worker process's id, while one runs.
    pub fn worker_pid(&self) -> Option<u32> {
        Some(self.worker_pid.load(Ordering::SeqCst)).filter(|&pid| pid != 0)
    }

    /// Takes no more jobs and interrupts the running one.
    fn stop_jobs(&self) {
        self.state.queue.close();
        if let Some(job) = self.state.queue.running() {
            job.interrupt();
        }
    }

    /// Lets the running job stop at its next step, then stops the worker process.
    pub fn shut_down(self) {
        self.stop_jobs();
        let _ = self.supervisor.join();
    }
}

/// The worker's device, as the protocol names it.
fn device_spec(device: &candle_core::Device) -> DeviceSpec {
    match device.location() {
        candle_core::DeviceLocation::Cpu => DeviceSpec::Cpu,
        candle_core::DeviceLocation::Cuda { gpu_id } => DeviceSpec::Cuda(gpu_id),
        candle_core::DeviceLocation::Metal { gpu_id } => DeviceSpec::Metal(gpu_id),
    }
}

fn router(state: Arc<AppState>, config: &ServerConfig) -> Router {
    let sdapi = Router::new()
        .route("/txt2img", post(a1111::txt2img))
        .route("/img2img", post(a1111::img2img))
        .route("/progress", get(a1111::progress))
        .route("/interrupt", post(a1111::interrupt))
        .route("/skip", post(a1111::skip))
        .route("/options", get(a1111::get_options).post(a1111::set_options))
        .route("/sd-models", get(a1111::sd_models))
        .route("/refresh-checkpoints", post(a1111::refresh_checkpoints))
        .route("/samplers", get(a1111::samplers))
        .route("/schedulers", get(a1111::schedulers))
        .route("/upscalers", get(a1111::upscalers))
        .route("/latent-upscale-modes", get(a1111::latent_upscale_modes))
        .route("/png-info", post(a1111::png_info))
        .route("/scripts", get(a1111::scripts))
        .route("/script-info", get(a1111::empty_list))
        .route("/sd-vae", get(a1111::empty_list))
        .route("/loras", get(loras::list))
        .route("/refresh-loras", post(loras::refresh))
        .route("/embeddings", get(a1111::embeddings))
        .route("/refresh-embeddings", post(a1111::refresh_embeddings))
        .route("/prompt-styles", get(a1111::empty_list));
    let jobs = Router::new()
        .route("/", post(jobs::submit).get(jobs::list))
        .route("/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/{id}/events", get(jobs::events))
        .route("/{id}/preview", get(jobs::preview))
        .route("/{id}/images/{index}", get(jobs::image));
    let mut app = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .nest("/sdapi/v1", sdapi)
        .nest("/sdrs/v1/jobs", jobs)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method",
            )
        })
        .with_state(state);
    if !config.auth.is_empty() {
        app = app.layer(axum::middleware::from_fn_with_state(
            Arc::new(config.auth.clone()),
            auth::require,
        ));
    }
    let guard = guard::Guard {
        allowed_hosts: config.allowed_hosts.clone(),
        cors_allow_origins: config.cors_allow_origins.clone(),
        max_body_bytes: config.limits.max_body_bytes,
    };
    app.layer(axum::middleware::from_fn_with_state(
        Arc::new(guard),
        guard::check,
    ))
    .layer(axum::middleware::from_fn(guard::json_errors))
}
