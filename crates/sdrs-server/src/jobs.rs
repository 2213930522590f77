//! sdrs' own job API (`/sdrs/v1/jobs`): submit and come back, follow progress as it
//! happens (server-sent events), fetch images, cancel.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use sdrs::image_io::encode_png;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::queue::{Job, JobId, Work};
use crate::request;
use crate::AppState;

/// What a client sees of a job.
pub fn view(state: &AppState, job: &Job) -> Value {
    let s = job.status();
    let (kind, request) = match &job.work {
        Work::Generate { request, init } => (
            if init.is_some() { "img2img" } else { "txt2img" },
            serde_json::to_value(request).unwrap_or(Value::Null),
        ),
        Work::LoadModel { model } => ("load-model", json!({ "model": model.title })),
    };
    let results: Vec<Value> = s
        .results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "seed": sdrs::pipeline::signed_seed(r.seed),
                "infotext": r.infotext,
                "path": r.path.display().to_string(),
                "url": format!("/sdrs/v1/jobs/{}/images/{i}", job.id),
            })
        })
        .collect();
    json!({
        "id": job.id.to_string(),
        "kind": kind,
        "state": s.state,
        "position": state.queue.position(job.id),
        "progress": s.progress(),
        "eta_relative": s.eta_relative(),
        "image": s.image,
        "images": s.images,
        "step": s.step,
        "steps": s.steps,
        "error": s.error.map(|e| e.message),
        "results": results,
        "request": request,
    })
}

/// The job `id`, when the caller may see it: another user's job is as absent as a missing one.
fn find(state: &AppState, caller: &Caller, id: &str) -> Result<Arc<Job>, ApiError> {
    id.parse::<JobId>()
        .ok()
        .and_then(|id| state.queue.get(id))
        .filter(|job| job.visible_to(caller.name()))
        .ok_or_else(|| ApiError::not_found(format!("no job {:?}", shorten(id))))
}

/// An id as an error message quotes it, cut to 32 characters.
fn shorten(id: &str) -> String {
    id.chars().take(32).collect()
}

/// Queues a txt2img job, or img2img when the body has `init_images`; answers at once.
pub async fn submit(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    request: Request,
) -> Result<Response, ApiError> {
    let body = state.read_body(request).await?;
    let parsed = request::parse(&body, false, &state.limits)?;
    let work = Work::Generate {
        request: Box::new(parsed.request),
        init: parsed.init,
    };
    let job = state.submit(work, caller)?;
    let location = format!("/sdrs/v1/jobs/{}", job.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(view(&state, &job)),
    )
        .into_response())
}

/// The caller's jobs, oldest first.
pub async fn list(State(state): State<Arc<AppState>>, caller: Caller) -> Json<Value> {
    let jobs: Vec<Value> = state
        .queue
        .jobs()
        .iter()
        .filter(|j| j.visible_to(caller.name()))
        .map(|j| view(&state, j))
        .collect();
    Json(Value::Array(jobs))
}

pub async fn get(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &caller, &id)?;
    Ok(Json(view(&state, &job)))
}

/// Cancels a job: a waiting one never runs; a running one stops at its next step and keeps
/// the images it made.
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let job = find(&state, &caller, &id)?;
    state.queue.cancel(job.id);
    Ok(Json(view(&state, &job)))
}

pub async fn image(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = find(&state, &caller, &id)?;
    let status = job.status();
    let finished = index
        .parse::<usize>()
        .ok()
        .and_then(|i| status.results.get(i))
        .ok_or_else(|| {
            ApiError::not_found(format!("job {} has no image {:?}", job.id, shorten(&index)))
        })?;
    Ok(([(header::CONTENT_TYPE, "image/png")], finished.png.to_vec()).into_response())
}

/// The running job's live preview (a small picture of the latent, no VAE).
pub async fn preview(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = find(&state, &caller, &id)?;
    let png = job
        .preview()
        .and_then(|p| encode_png(&p, None).ok())
        .ok_or_else(|| ApiError::not_found("no preview yet"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png,
    )
        .into_response())
}

/// Server-sent events: a `progress` event whenever the job changes, then one `done` event
/// with its final state, and the stream ends.
pub async fn events(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find(&state, &caller, &id)?;
    // (updates, the last state was final, first event): the first event is the job as it
    // is now; later ones wait for a change; the stream ends after the final state's event.
    let start = (job.subscribe(), false, true);
    let stream = futures_util::stream::unfold(start, move |(mut updates, ended, first)| {
        let (state, job) = (state.clone(), job.clone());
        async move {
            if ended || (!first && updates.changed().await.is_err()) {
                return None;
            }
            let last = updates.borrow_and_update().state.is_final();
            let name = if last { "done" } else { "progress" };
            let event = Event::default()
                .event(name)
                .json_data(view(&state, &job))
                .unwrap_or_else(|_| Event::default().event(name));
            Some((Ok(event), (updates, last, false)))
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
