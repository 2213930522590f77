//! The LoRA folder: which files it holds, under which names, their A1111 short hashes, and the
//! last files read.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use serde::Serialize;

use super::file::{self, LoraLayers};
use crate::limits::{exceeded, MAX_ADDON_DEPTH, MAX_ADDON_FILES};
use crate::{Error, Result};

/// File endings a LoRA folder is searched for.
const EXTENSIONS: [&str; 4] = ["safetensors", "pt", "ckpt", "bin"];

/// One LoRA file of the folder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraEntry {
    /// The file stem: the name `<lora:NAME:…>` uses.
    pub name: String,
    /// The name the trainer gave it (kohya's `ss_output_name`), also accepted in tags.
    pub alias: Option<String>,
    /// Where the file is.
    pub path: PathBuf,
}

/// What is known of each file, with the modification time it was learnt at.
type ByFile<T> = HashMap<PathBuf, (Option<SystemTime>, T)>;

/// The LoRA files of a folder, found by name; files read are kept while they are in use.
pub struct LoraLibrary {
    dir: Option<PathBuf>,
    entries: RwLock<Vec<LoraEntry>>,
    /// The files of the last set asked for, by path, with the modification time they were
    /// read at.
    read: Mutex<ByFile<Arc<LoraLayers>>>,
    hashes: Mutex<ByFile<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl LoraLibrary {
    /// The library of `dir` (none: no LoRAs), scanned now.
    pub fn new(dir: Option<PathBuf>) -> Self {
        let library = Self {
            dir,
            entries: RwLock::new(Vec::new()),
            read: Mutex::new(HashMap::new()),
            hashes: Mutex::new(HashMap::new()),
        };
        library.refresh();
        library
    }

    /// The folder searched.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Scans the folder again (A1111's "refresh"); a missing folder holds nothing.
    pub fn refresh(&self) {
        let found = self.dir.as_deref().map(scan).unwrap_or_default();
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = found;
    }

    /// Every LoRA of the folder, sorted by name.
    pub fn list(&self) -> Vec<LoraEntry> {
        self.entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The entry `name` means: a file stem, else an alias, else (when the infotext the request
    /// came from gave one) the file with that short hash. Unknown names are an error listing
    /// the closest names.
    pub fn find(&self, name: &str, hash: Option<&str>) -> Result<LoraEntry> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.iter().find(|e| e.name == name) {
            return Ok(e.clone());
        }
        if let Some(e) = entries.iter().find(|e| e.alias.as_deref() == Some(name)) {
            return Ok(e.clone());
        }
        if let Some(hash) = hash {
            for e in entries.iter() {
                if self.short_hash(&e.path).ok().as_deref() == Some(hash) {
                    return Ok(e.clone());
                }
            }
        }
        let close = close_names(name, entries.iter().map(|e| e.name.as_str()));
        let place = match &self.dir {
            Some(dir) => format!("in {}", dir.display()),
            None => "(no LoRA folder is set: --lora-dir)".into(),
        };
        let hint = if close.is_empty() {
            String::new()
        } else {
            format!("; close names: {}", close.join(", "))
        };
        Err(Error::InvalidRequest(format!(
            "no LoRA called {name:?} {place}{hint}"
        )))
    }

    /// A1111's short hash of a LoRA file: the first 12 hex digits of kohya's `sshs_model_hash`
    /// when the file's metadata has one, else of the SHA-256 of a safetensors file's tensor
    /// bytes (after its header: the "addnet" hash), else of the whole file.
    pub fn short_hash(&self, path: &Path) -> Result<String> {
        let mtime = modified(path);
        if let Some((m, h)) = lock(&self.hashes).get(path) {
            if *m == mtime {
                return Ok(h.clone());
            }
        }
        let hash = file_hash(path)?;
        let short: String = hash.chars().take(12).collect();
        lock(&self.hashes).insert(path.to_path_buf(), (mtime, short.clone()));
        Ok(short)
    }

    /// The file of `entry`, read (or kept from an earlier read, if unchanged since).
    pub(crate) fn read(&self, entry: &LoraEntry) -> Result<Arc<LoraLayers>> {
        let mtime = modified(&entry.path);
        if let Some((m, layers)) = lock(&self.read).get(&entry.path) {
            if *m == mtime {
                return Ok(layers.clone());
            }
        }
        let layers = Arc::new(file::read(&entry.path)?);
        lock(&self.read).insert(entry.path.clone(), (mtime, layers.clone()));
        Ok(layers)
    }

    /// Forgets the files read, except `keep`.
    pub(crate) fn keep_only(&self, keep: &[&Path]) {
        lock(&self.read).retain(|path, _| keep.contains(&path.as_path()));
    }
}

fn file_hash(path: &Path) -> Result<String> {
    let io = |e| Error::io(path, e);
    let meta = crate::weights::safetensors_metadata(path).unwrap_or_default();
    if let Some(h) = meta.get("sshs_model_hash").filter(|h| h.len() >= 12) {
        return Ok(h.to_ascii_lowercase());
    }
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut prefix = [0u8; 8];
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors && f.read_exact(&mut prefix).is_ok() {
        let header = u64::from_le_bytes(prefix);
        f.seek(SeekFrom::Start(8u64.saturating_add(header)))
            .map_err(io)?;
    } else {
        f.seek(SeekFrom::Start(0)).map_err(io)?;
    }
    crate::weights::file_hash::sha256_rest(f).map_err(io)
}

/// The LoRA files under `dir` (subfolders to [`MAX_ADDON_DEPTH`], at most
/// [`MAX_ADDON_FILES`] of them), sorted by name; unreadable folders are passed over.
fn scan(dir: &Path) -> Vec<LoraEntry> {
    let mut out = Vec::new();
    let mut folders = vec![(dir.to_path_buf(), 0usize)];
    while let Some((folder, depth)) = folders.pop() {
        let Ok(read) = std::fs::read_dir(&folder) else {
            continue;
        };
        for item in read.flatten() {
            let path = item.path();
            let Ok(kind) = item.file_type() else { continue };
            if kind.is_dir() || (kind.is_symlink() && path.is_dir()) {
                if depth < MAX_ADDON_DEPTH {
                    folders.push((path, depth + 1));
                }
                continue;
            }
            let known = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)));
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if !known {
                continue;
            }
            if out.len() == MAX_ADDON_FILES {
                tracing::warn!(
                    "{}",
                    exceeded(
                        format!("{}: LoRA files", dir.display()),
                        MAX_ADDON_FILES + 1,
                        "MAX_ADDON_FILES",
                        MAX_ADDON_FILES
                    )
                );
                return sorted(out);
            }
            let alias = crate::weights::safetensors_metadata(&path)
                .ok()
                .and_then(|m| m.get("ss_output_name").cloned())
                .filter(|a| a != name && !a.is_empty());
            out.push(LoraEntry {
                name: name.to_string(),
                alias,
                path,
            });
        }
    }
    sorted(out)
}

fn sorted(mut entries: Vec<LoraEntry>) -> Vec<LoraEntry> {
    entries.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
    entries
}

/// Up to five of `names` closest to `name`: sharing a case-insensitive substring, or within
/// an edit distance of a third of its length.
pub(crate) fn close_names<'a>(name: &str, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let want = name.to_lowercase();
    let mut scored: Vec<(usize, &str)> = names
        .filter_map(|n| {
            let lower = n.to_lowercase();
            let d = edit_distance(&want, &lower);
            let near = d <= want.chars().count().div_ceil(3).max(1);
            (near || lower.contains(&want) || want.contains(&lower)).then_some((d, n))
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(5)
        .map(|(_, n)| n.to_string())
        .collect()
}

/// Levenshtein distance of two short names (bounded: names are at most a few hundred bytes).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(256).collect();
    let b: Vec<char> = b.chars().take(256).collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_names_rank_by_distance() {
        let names = [
            "detail_tweaker",
            "detail-slider",
            "anime_style",
            "DetailTweak",
        ];
        let got = close_names("detail_tweak", names.into_iter());
        assert_eq!(got[0], "DetailTweak");
        assert!(got.contains(&"detail_tweaker".to_string()));
        assert!(!got.contains(&"anime_style".to_string()));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
