//! A1111's LoRA routes: `GET /sdapi/v1/loras` lists the LoRA folder, `POST
//! /sdapi/v1/refresh-loras` scans it again (here, and in the worker before its next job).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use sdrs::lora::LoraEntry;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::AppState;

/// The folder's files as A1111 lists them: `{name, alias, path, metadata}`, sorted by name.
pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let dir = state.loras.dir();
    let list: Vec<Value> = state
        .loras
        .list()
        .iter()
        .filter_map(|entry| describe(entry, dir?))
        .collect();
    Json(Value::Array(list))
}

/// One entry, its `path` relative to the LoRA folder: the listing names the folder's own
/// files and nothing else of the server's disk. An entry outside the folder is left out.
fn describe(entry: &LoraEntry, dir: &Path) -> Option<Value> {
    let relative = entry.path.strip_prefix(dir).ok()?;
    Some(json!({
        "name": entry.name,
        // A1111's alias is the trainer's name when the file has one, else the file's.
        "alias": entry.alias.as_deref().unwrap_or(&entry.name),
        "path": relative.to_string_lossy().replace('\\', "/"),
        // A1111 sends the file's training metadata; sdrs does not read it for clients.
        "metadata": {},
    }))
}

/// Scans the folder again, one scan at a time however many clients ask; answers `null`, as
/// A1111 does.
pub async fn refresh(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let _one_at_a_time = state.lora_refresh.lock().await;
    let scanning = state.clone();
    tokio::task::spawn_blocking(move || scanning.loras.refresh())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("scanning the LoRA folder: {e}"),
            )
        })?;
    state.addon_scans.fetch_add(1, Ordering::SeqCst);
    Ok(Json(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_named_relative_to_the_folder_and_outsiders_left_out() {
        let dir = Path::new("/srv/loras");
        let entry = |path: &str, alias: Option<&str>| LoraEntry {
            name: "detail".into(),
            alias: alias.map(str::to_string),
            path: path.into(),
        };
        let got = describe(&entry("/srv/loras/sub/detail.safetensors", None), dir).unwrap();
        assert_eq!(
            got,
            json!({"name": "detail", "alias": "detail", "path": "sub/detail.safetensors",
                   "metadata": {}})
        );
        let got = describe(&entry("/srv/loras/detail.pt", Some("Detailer")), dir).unwrap();
        assert_eq!(got["alias"], "Detailer");
        assert!(describe(&entry("/etc/detail.safetensors", None), dir).is_none());
    }
}
