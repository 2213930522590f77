//! `sdrs serve`: A1111's HTTP API (`/sdapi/v1`) and sdrs' job API (`/sdrs/v1/jobs`) over
//! one FIFO queue that a single worker thread runs on the model, and the web page at `/`.

mod a1111;
mod auth;
mod config;
mod error;
mod jobs;
mod models;
mod preview;
mod queue;
mod request;
mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::response::Html;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};

pub use config::{parse_auth, Limits, ServerConfig};

use error::ApiError;
use models::ModelEntry;
use queue::{Job, JobStatus, Queue, Work};
use worker::{CurrentModel, LoadedModel, Worker};

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
}

impl AppState {
    fn submit(&self, work: Work) -> Result<Arc<Job>, ApiError> {
        self.queue.submit(work).map_err(|full| {
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
    async fn run_to_end(&self, work: Work) -> Result<JobStatus, ApiError> {
        let job = self.submit(work)?;
        let mut updates = job.subscribe();
        let status = updates
            .wait_for(|s| s.state.is_final())
            .await
            .map(|s| s.clone())
            .map_err(|_| {
                ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "the worker stopped",
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

    /// The stored options with the loaded model filled in.
    fn options(&self) -> Map<String, Value> {
        let mut options = self
            .options
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
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

/// A server ready to answer: its routes, its state, and the worker running behind them.
pub struct Server {
    pub router: Router,
    state: Arc<AppState>,
    worker: std::thread::JoinHandle<()>,
}

impl Server {
    /// Lists the models, starts the worker and queues the first model's load (requests queue
    /// behind it, so the server answers at once).
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
        let queue = Arc::new(Queue::new(
            config.limits.max_queue,
            config.limits.keep_finished,
        ));
        let current = CurrentModel::default();
        let worker = Worker {
            queue: queue.clone(),
            device: config.device.clone(),
            network: config.network,
            outdir: config.outdir.clone(),
            current: current.clone(),
        }
        .spawn();
        // The first load counts against no client's queue space.
        queue
            .submit(Work::LoadModel { model: first })
            .map_err(|_| anyhow::anyhow!("the queue refused the first model load"))?;
        let options = json!({
            "samples_save": true,
            "samples_format": "png",
            "outdir_samples": config.outdir.display().to_string(),
            "CLIP_stop_at_last_layers": 1,
        });
        let state = Arc::new(AppState {
            queue,
            limits: config.limits,
            model_arg: config.model.clone(),
            models_dir: config.models_dir.clone(),
            models: Mutex::new(found),
            current,
            options: Mutex::new(match options {
                Value::Object(m) => m,
                _ => Map::new(),
            }),
        });
        let router = router(state.clone(), &config.auth, config.limits);
        Ok(Self {
            router,
            state,
            worker,
        })
    }

    /// Lets the running job finish, then stops the worker.
    pub fn shut_down(self) {
        self.state.queue.close();
        if let Some(job) = self.state.queue.running() {
            job.interrupt();
        }
        let _ = self.worker.join();
    }
}

fn router(state: Arc<AppState>, auth: &[(String, String)], limits: Limits) -> Router {
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
        .route("/loras", get(a1111::empty_list))
        .route(
            "/embeddings",
            get(|| async { axum::Json(json!({"loaded": {}, "skipped": {}})) }),
        )
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
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state);
    if !auth.is_empty() {
        app = app.layer(axum::middleware::from_fn_with_state(
            Arc::new(auth.to_vec()),
            auth::require,
        ));
    }
    app
}

/// Serves until Ctrl-C.
pub async fn serve(config: ServerConfig) -> Result<()> {
    let server = Server::start(&config)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    eprintln!(
        "sdrs: serving on http://{} (A1111 API at /sdapi/v1, jobs at /sdrs/v1/jobs); Ctrl-C stops",
        listener.local_addr().unwrap_or(config.listen)
    );
    axum::serve(listener, server.router.clone())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")?;
    tokio::task::spawn_blocking(move || server.shut_down()).await?;
    Ok(())
}
