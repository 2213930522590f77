//! Downloads into the Hugging Face cache layout (`models--owner--name/{blobs,snapshots,refs}`)
//! through the `hf-hub` client, which resumes from a `.part` file; each weight file is then
//! checked against the SHA-256 the Hub names it by.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo};

use super::{CatalogueEntry, Hub};
use crate::{Error, Result};

/// Told about each file as it downloads: `init(total bytes, file name)`, then `update(bytes
/// added)`, then `finish()`. `()` shows nothing.
pub use hf_hub::api::Progress;

/// How often a broken transfer is resumed within one download before giving up.
const RETRIES: usize = 3;

fn repo_id(entry: &CatalogueEntry) -> Repo {
    Repo::model(entry.repo.to_string())
}

fn snapshot_dir(hub: &Hub, entry: &CatalogueEntry) -> Option<PathBuf> {
    let repo_dir = hub.cache_dir.join(repo_id(entry).folder_name());
    let commit = std::fs::read_to_string(repo_dir.join("refs").join("main")).ok()?;
    Some(repo_dir.join("snapshots").join(commit.trim()))
}

pub(super) fn cached_snapshot(hub: &Hub, entry: &CatalogueEntry) -> Option<PathBuf> {
    let dir = snapshot_dir(hub, entry)?;
    // `exists` follows the snapshot's links, so a link whose blob is gone counts as missing.
    entry
        .files
        .iter()
        .all(|f| dir.join(f).exists())
        .then_some(dir)
}

/// Lets hf-hub, which takes its progress by value, report to the caller's.
struct Forward<'a>(&'a mut dyn Progress);

impl Progress for Forward<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.init(size, filename)
    }
    fn update(&mut self, size: usize) {
        self.0.update(size)
    }
    fn finish(&mut self) {
        self.0.finish()
    }
}

enum FetchError {
    NotOnHub,
    Failed(String),
}

pub(super) fn pull(
    hub: &Hub,
    entry: &CatalogueEntry,
    progress: &mut dyn Progress,
) -> std::result::Result<PathBuf, String> {
    let api = ApiBuilder::from_cache(Cache::new(hub.cache_dir.clone()))
        .with_endpoint(hub.endpoint.clone())
        .with_token(hub.token.clone())
        .with_retries(RETRIES)
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.repo(repo_id(entry));
    let have = |file: &str| snapshot_dir(hub, entry).is_some_and(|d| d.join(file).exists());
    for file in entry.files {
        if !have(file) {
            match fetch(&repo, file, progress) {
                Ok(()) => {}
                Err(FetchError::NotOnHub) => {
                    return Err(format!("{file}: the repository has no such file (404)"))
                }
                Err(FetchError::Failed(reason)) => return Err(format!("{file}: {reason}")),
            }
        }
    }
    for file in entry.optional_files {
        if !have(file) {
            match fetch(&repo, file, progress) {
                Ok(()) | Err(FetchError::NotOnHub) => {}
                Err(FetchError::Failed(reason)) => return Err(format!("{file}: {reason}")),
            }
        }
    }
    cached_snapshot(hub, entry)
        .ok_or_else(|| "the files downloaded, but the cache does not list them all".into())
}

fn fetch(
    repo: &ApiRepo,
    file: &str,
    progress: &mut dyn Progress,
) -> std::result::Result<(), FetchError> {
    let pointer = repo
        .download_with_progress(file, Forward(progress))
        .map_err(describe)?;
    verify(&pointer).map_err(FetchError::Failed)
}

fn describe(e: ApiError) -> FetchError {
    let inner = match &e {
        ApiError::TooManyRetries(inner) => inner.as_ref(),
        other => other,
    };
    match inner {
        ApiError::RequestError(r) => match r.as_ref() {
            ureq::Error::Status(404, _) => FetchError::NotOnHub,
            ureq::Error::Status(code @ (401 | 403), _) => FetchError::Failed(format!(
                "access denied (HTTP {code}); a gated or private repository needs HF_TOKEN"
            )),
            ureq::Error::Status(code, _) => {
                FetchError::Failed(format!("the Hub answered HTTP {code}"))
            }
            ureq::Error::Transport(t) => FetchError::Failed(format!("no connection: {t}")),
        },
        ApiError::InvalidResume => FetchError::Failed(
            "the partial download in the cache is longer than the file; delete its .part file"
                .into(),
        ),
        _ => FetchError::Failed(e.to_string()),
    }
}

/// The cache names a large (LFS) file's blob by its SHA-256; a blob that does not hash to its
/// name is deleted with its snapshot link, so the next run downloads it again.
fn verify(pointer: &Path) -> std::result::Result<(), String> {
    let blob = std::fs::canonicalize(pointer).map_err(|e| format!("{}: {e}", pointer.display()))?;
    let name = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let is_sha256 = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_sha256 {
        return Ok(());
    }
    let actual = crate::weights::file_hash::sha256_file(&blob)
        .map_err(|e| format!("{}: {e}", blob.display()))?;
    if actual == name {
        return Ok(());
    }
    // Best effort: a failure to delete leaves a blob the next pull replaces anyway.
    let _ = std::fs::remove_file(&blob);
    let _ = std::fs::remove_file(pointer);
    Err(format!(
        "checksum mismatch: the download hashes to {actual}, the Hub says {name}; the corrupt file was deleted"
    ))
}

pub(super) fn remove(hub: &Hub, entry: &CatalogueEntry) -> Result<u64> {
    let repo_dir = hub.cache_dir.join(repo_id(entry).folder_name());
    let snapshots = repo_dir.join("snapshots");
    let Ok(commits) = std::fs::read_dir(&snapshots) else {
        return Ok(0);
    };
    let mut freed = 0;
    for commit in commits.flatten() {
        let dir = commit.path();
        for file in entry.files.iter().chain(entry.optional_files) {
            let pointer = dir.join(file);
            if pointer.symlink_metadata().is_err() {
                continue;
            }
            if let Ok(blob) = std::fs::canonicalize(&pointer) {
                if blob != pointer {
                    freed += std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
                    std::fs::remove_file(&blob).map_err(|e| Error::io(&blob, e))?;
                }
            }
            freed += std::fs::symlink_metadata(&pointer)
                .ok()
                .filter(|m| m.is_file())
                .map_or(0, |m| m.len());
            std::fs::remove_file(&pointer).map_err(|e| Error::io(&pointer, e))?;
            remove_empty_parents(&pointer, &snapshots);
        }
    }
    // With no snapshot left, what remains (refs, locks, partial downloads) belongs to nothing.
    let empty = std::fs::read_dir(&snapshots).is_ok_and(|mut d| d.next().is_none());
    if empty {
        std::fs::remove_dir_all(&repo_dir).map_err(|e| Error::io(&repo_dir, e))?;
    }
    Ok(freed)
}

/// Removes the empty folders between `path` and `stop` (exclusive).
fn remove_empty_parents(path: &Path, stop: &Path) {
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == stop || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
}
