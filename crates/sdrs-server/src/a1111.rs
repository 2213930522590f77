//! A1111's `/sdapi/v1` routes, answered as A1111 answers them, on top of the job queue.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use sdrs::image_io::{encode_png, read_parameters};
use sdrs::pipeline::infotext;
use sdrs::sampling::{Sampler, SigmaSchedule};
use sdrs::upscale::BuiltinUpscaler;
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::models;
use crate::queue::{Job, JobState, JobStatus, Work};
use crate::request::{self, decode_base64, image_from_bytes, ParsedRequest};
use crate::AppState;

type Api = Result<Json<Value>, ApiError>;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub async fn txt2img(State(state): State<Arc<AppState>>, caller: Caller, request: Request) -> Api {
    let body = state.read_body(request).await?;
    let parsed = request::parse(&body, false, &state.limits)?;
    generate(&state, caller, parsed).await
}

pub async fn img2img(State(state): State<Arc<AppState>>, caller: Caller, request: Request) -> Api {
    let body = state.read_body(request).await?;
    let parsed = request::parse(&body, true, &state.limits)?;
    generate(&state, caller, parsed).await
}

/// Queues the request and answers when it is done. A client that disconnects first loses
/// only the answer: the job runs on and its images are saved.
async fn generate(state: &AppState, caller: Caller, parsed: ParsedRequest) -> Api {
    let ParsedRequest {
        request,
        init,
        parameters,
    } = parsed;
    let work = Work::Generate {
        request: Box::new(request.clone()),
        init,
    };
    let status = state.run_to_end(work, caller).await?;
    if let Some(error) = &status.error {
        let code = if error.bad_request {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        return Err(ApiError::new(code, error.message.clone()));
    }
    let images: Vec<String> = status.results.iter().map(|r| b64(&r.png)).collect();
    let info = info_json(state, &request, &status);
    Ok(Json(json!({
        "images": images,
        "parameters": parameters,
        "info": info.to_string(),
    })))
}

/// A1111's `Processed.js()`: the keys clients read from `info`.
fn info_json(
    state: &AppState,
    generation: &sdrs::pipeline::Generation,
    status: &JobStatus,
) -> Value {
    let request = generation.request();
    let count = request.image_count();
    let seed = request.seed;
    let all_seeds: Vec<i64> = (0..count as i64).map(|i| seed.wrapping_add(i)).collect();
    let model = state.current_model();
    json!({
        "prompt": request.prompt,
        "all_prompts": vec![&request.prompt; count],
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": vec![&request.negative_prompt; count],
        "seed": seed,
        "all_seeds": all_seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; count],
        "subseed_strength": 0,
        "width": request.width,
        "height": request.height,
        "sampler_name": request.sampler_name,
        "cfg_scale": request.cfg_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model.as_ref().map(|m| m.entry.model_name.clone()),
        "sd_model_hash": model.as_ref().and_then(|m| m.hash.clone()),
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": request.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": status.results.iter().map(|r| r.infotext.clone()).collect::<Vec<_>>(),
        "styles": [],
        "job_timestamp": timestamp(status.submitted),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": false,
        "interrupted": status.state == JobState::Interrupted,
        "version": concat!("sdrs ", env!("CARGO_PKG_VERSION")),
    })
}

/// `YYYYMMDDhhmmss` in UTC (A1111 writes local time; a server has no better local zone).
fn timestamp(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub struct ProgressQuery {
    skip_current_image: bool,
}

/// The running job, when `caller` may see it.
fn running_job(state: &AppState, caller: &Caller) -> Option<Arc<Job>> {
    state
        .queue
        .running()
        .filter(|job| job.visible_to(caller.name()))
}

/// A1111's `/progress`: the running job's share done, its ETA and a preview. With
/// `--api-auth`, another user's job shows as no job.
pub async fn progress(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Query(query): Query<ProgressQuery>,
) -> Json<Value> {
    let Some(job) = running_job(&state, &caller) else {
        return Json(json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": false, "interrupted": false, "stopping_generation": false,
                "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0,
                "sampling_step": 0, "sampling_steps": 0,
            },
            "current_image": null,
            "textinfo": null,
            "current_task": null,
            "queued": state.queue.pending_len(),
        }));
    };
    let s = job.status();
    let current_image = if query.skip_current_image {
        None
    } else {
        job.preview()
            .and_then(|p| encode_png(&p, None).ok())
            .map(|png| b64(&png))
    };
    Json(json!({
        "progress": s.progress(),
        "eta_relative": s.eta_relative(),
        "state": {
            "skipped": s.skipped,
            "interrupted": s.interrupted,
            "stopping_generation": false,
            "job": format!("job {}", job.id),
            "job_count": s.images,
            "job_timestamp": timestamp(s.submitted),
            "job_no": s.image,
            "sampling_step": s.step,
            "sampling_steps": s.steps,
        },
        "current_image": current_image,
        "textinfo": null,
        "current_task": job.id.to_string(),
        "queued": state.queue.pending_len(),
    }))
}

/// Interrupts the running job, if it is the caller's.
pub async fn interrupt(State(state): State<Arc<AppState>>, caller: Caller) -> Json<Value> {
    if let Some(job) = running_job(&state, &caller) {
        job.interrupt();
    }
    Json(json!({}))
}

/// Skips the running job's current image, if the job is the caller's.
pub async fn skip(State(state): State<Arc<AppState>>, caller: Caller) -> Json<Value> {
    if let Some(job) = running_job(&state, &caller) {
        job.skip();
    }
    Json(json!({}))
}

pub async fn get_options(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(Value::Object(state.options()))
}

/// Stores the options; `sd_model_checkpoint` switches the model (in queue order, answered
/// when the new model is loaded, as A1111 does). Only the keys GET reports are taken, each
/// with a value of its kind; anything else is a 422 and nothing is changed.
pub async fn set_options(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    request: Request,
) -> Api {
    let body = crate::body::read_json(
        request,
        sdrs::limits::MAX_OPTIONS_BODY_BYTES,
        state.limits.body_timeout,
    )
    .await?;
    let changes = request::json_object(&body)?;
    let keep = crate::options::check(&changes, &state.stored_options())?;
    if let Some(name) = changes.get("sd_model_checkpoint").and_then(Value::as_str) {
        let models = state.models();
        let entry = models::find(&models, name).cloned().ok_or_else(|| {
            ApiError::invalid(format!(
                "no model {name:?}; this server has: {}",
                models
                    .iter()
                    .map(|m| m.title.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let loaded = state.current_model().map(|m| m.entry);
        if loaded.as_ref() != Some(&entry) {
            let status = state
                .run_to_end(Work::LoadModel { model: entry }, caller)
                .await?;
            if let Some(e) = status.error {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.message));
            }
        }
    }
    state.store_options(keep);
    Ok(Json(json!(null)))
}

pub async fn sd_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let current = state.current_model();
    let list: Vec<Value> = state
        .models()
        .iter()
        .map(|m| {
            let hash = current
                .as_ref()
                .filter(|c| c.entry == *m)
                .and_then(|c| c.hash.clone());
            json!({
                "title": m.title,
                "model_name": m.model_name,
                "hash": hash,
                "sha256": null,
                "filename": m.path.display().to_string(),
                "config": null,
            })
        })
        .collect();
    Json(Value::Array(list))
}

pub async fn refresh_checkpoints(State(state): State<Arc<AppState>>) -> Json<Value> {
    state.rescan_models();
    Json(json!(null))
}

/// A1111's `/sdapi/v1/embeddings`: the embeddings folder (the one the worker loads with the
/// current model), read here with the same reader, loaded and skipped as A1111 lists them.
pub async fn embeddings(State(state): State<Arc<AppState>>) -> Json<Value> {
    let model = state.current_model().map(|m| m.entry.path);
    let dir = state.embeddings_dir.clone();
    let listing = tokio::task::spawn_blocking(move || embeddings_listing(&model?, &dir?))
        .await
        .ok()
        .flatten();
    Json(listing.unwrap_or_else(|| json!({"loaded": {}, "skipped": {}})))
}

fn embeddings_listing(model: &std::path::Path, dir: &std::path::Path) -> Option<Value> {
    if !dir.is_dir() {
        return None;
    }
    let checkpoint = sdrs::weights::Checkpoint::open(model).ok()?;
    // Every text encoder's vectors side by side (SDXL's 768 + 1280), as A1111's `shape`.
    let width = (0..)
        .map_while(|i| checkpoint.text_encoder_config(i))
        .map(|(config, _)| config.hidden_size)
        .sum();
    let tokenizer = sdrs::tokenizer::Tokenizer::new().ok()?;
    let db = sdrs::embeddings::Embeddings::load_dir(dir, &tokenizer, width).ok()?;
    let entry = |i: &sdrs::embeddings::EmbeddingInfo| {
        json!({
            "step": i.step,
            "sd_checkpoint": i.sd_checkpoint,
            "sd_checkpoint_name": i.sd_checkpoint_name,
            "shape": i.width,
            "vectors": i.vectors,
        })
    };
    let loaded: Map<String, Value> = db
        .loaded()
        .iter()
        .map(|e| (e.info.name.clone(), entry(&e.info)))
        .collect();
    // A1111 lists files of another width; files that are no embedding are only logged.
    let skipped: Map<String, Value> = db
        .skipped()
        .iter()
        .filter_map(|s| Some((s.name.clone(), entry(s.info.as_ref()?))))
        .collect();
    Some(json!({"loaded": loaded, "skipped": skipped}))
}

/// A1111's `/sdapi/v1/refresh-embeddings`: the listing reads the folder afresh on every call;
/// the worker reads it again before its next job.
pub async fn refresh_embeddings(State(state): State<Arc<AppState>>) -> Json<Value> {
    state
        .addon_scans
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Json(json!(null))
}

pub async fn samplers() -> Json<Value> {
    let list: Vec<Value> = Sampler::all()
        .into_iter()
        .map(|s| json!({ "name": s.name(), "aliases": s.aliases(), "options": {} }))
        .collect();
    Json(Value::Array(list))
}

pub async fn schedulers() -> Json<Value> {
    let list: Vec<Value> = SigmaSchedule::all()
        .into_iter()
        .map(|s| {
            // A1111 lists the spellings besides its name and label, or null for none.
            let aliases: Vec<&str> = [s.name()]
                .into_iter()
                .filter(|name| *name != s.a1111_name())
                .chain(s.aliases().iter().copied())
                .collect();
            // A1111's ρ (-1: the schedule has none) and whether it needs the model's sigmas.
            let (default_rho, need_inner_model) = match s {
                SigmaSchedule::Karras => (json!(7.0), false),
                SigmaSchedule::Normal => (json!(-1), false),
                SigmaSchedule::SgmUniform => (json!(-1), true),
            };
            json!({
                "name": s.a1111_name(),
                "label": s.label(),
                "aliases": (!aliases.is_empty()).then_some(aliases),
                "default_rho": default_rho,
                "need_inner_model": need_inner_model,
            })
        })
        .collect();
    Json(Value::Array(list))
}

/// A1111's image upscalers: the built-in ones that enlarge the decoded image.
pub async fn upscalers() -> Json<Value> {
    let list: Vec<Value> = BuiltinUpscaler::all()
        .into_iter()
        .filter(|u| !u.is_latent())
        .map(|u| {
            json!({"name": u.name(), "model_name": null, "model_path": null, "model_url": null,
                   "scale": 4})
        })
        .collect();
    Json(Value::Array(list))
}

/// A1111's latent upscale modes: the built-in upscalers that enlarge the latent.
pub async fn latent_upscale_modes() -> Json<Value> {
    let list: Vec<Value> = BuiltinUpscaler::all()
        .into_iter()
        .filter(|u| u.is_latent())
        .map(|u| json!({ "name": u.name() }))
        .collect();
    Json(Value::Array(list))
}

pub async fn scripts() -> Json<Value> {
    Json(json!({ "txt2img": [], "img2img": [] }))
}

pub async fn empty_list() -> Json<Value> {
    Json(json!([]))
}

/// A1111's `/png-info`: the image's `parameters` text and what it says, key by key.
pub async fn png_info(State(state): State<Arc<AppState>>, request: Request) -> Api {
    let body = state.read_body(request).await?;
    let fields = request::json_object(&body)?;
    let image = fields
        .get("image")
        .ok_or_else(|| ApiError::invalid("image: a base64 PNG is required"))?;
    let bytes = decode_base64(image, "image")?;
    // Refuse what is not an image at all; the infotext is then read from the file's bytes (a
    // PNG's text chunks, a JPEG's EXIF UserComment).
    image_from_bytes(&bytes, "image")?;
    let Some(info) = read_parameters(&bytes).ok().flatten() else {
        return Ok(Json(json!({ "info": "", "items": {}, "parameters": {} })));
    };
    let parsed = infotext::parse(&info);
    let mut parameters = Map::new();
    parameters.insert("Prompt".into(), parsed.prompt.clone().into());
    parameters.insert(
        "Negative prompt".into(),
        parsed.negative_prompt.clone().into(),
    );
    for (key, value) in &parsed.params {
        parameters.insert(key.clone(), value.clone().into());
    }
    Ok(Json(json!({
        "info": info,
        "items": { "parameters": info },
        "parameters": parameters,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |secs: u64| UNIX_EPOCH + std::time::Duration::from_secs(secs);
        assert_eq!(timestamp(at(0)), "19700101000000");
        // 2024-02-29 23:59:59 UTC (a leap day).
        assert_eq!(timestamp(at(1_709_251_199)), "20240229235959");
        assert_eq!(timestamp(at(1_709_251_200)), "20240301000000");
    }

    #[tokio::test]
    async fn upscaler_and_scheduler_lists_answer_as_a1111() {
        let Json(upscalers) = upscalers().await;
        let none = json!(null);
        assert_eq!(
            upscalers,
            json!([
                {"name": "None", "model_name": none, "model_path": none, "model_url": none, "scale": 4},
                {"name": "Lanczos", "model_name": none, "model_path": none, "model_url": none, "scale": 4},
            ])
        );
        let Json(modes) = latent_upscale_modes().await;
        assert_eq!(
            modes,
            json!([{"name": "Latent"}, {"name": "Latent (nearest)"}])
        );
        let Json(schedulers) = schedulers().await;
        assert_eq!(
            schedulers,
            json!([
                {"name": "automatic", "label": "Automatic", "aliases": ["normal", "uniform", "default"],
                 "default_rho": -1, "need_inner_model": false},
                {"name": "karras", "label": "Karras", "aliases": none, "default_rho": 7.0,
                 "need_inner_model": false},
                {"name": "sgm_uniform", "label": "SGM Uniform", "aliases": ["sgm-uniform", "SGMUniform"],
                 "default_rho": -1, "need_inner_model": true},
            ])
        );
    }
}
