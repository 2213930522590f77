//! SHA-256 of large files, remembered across runs by path, size and modification time (as
//! A1111 keeps its `cache.json`): hashing a 2–7 GB checkpoint for the infotext's "Model hash"
//! otherwise costs seconds at every start.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The SHA-256 of a file's contents, in lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_rest(std::fs::File::open(path)?)
}

/// The SHA-256 of what `file` holds from where it stands, in lower-case hex.
pub fn sha256_rest(mut file: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[derive(Serialize, Deserialize, PartialEq)]
struct Entry {
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

/// A JSON file of known hashes.
pub struct HashCache {
    file: PathBuf,
}

impl HashCache {
    /// The cache in `dir` (`hashes.json`).
    pub fn at(dir: &Path) -> Self {
        Self {
            file: dir.join("hashes.json"),
        }
    }

    /// `$SDRS_CACHE_DIR`, else `$XDG_CACHE_HOME/sdrs`, else `~/.cache/sdrs`.
    pub fn default_location() -> Option<Self> {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let dir = var("SDRS_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| var("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("sdrs")))
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache").join("sdrs")))?;
        Some(Self::at(&dir))
    }

    /// The file's SHA-256: remembered if its path, size and modification time are unchanged,
    /// else computed and remembered. A cache that cannot be read or written is passed over.
    pub fn sha256(&self, path: &Path) -> std::io::Result<String> {
        let meta = std::fs::metadata(path)?;
        let key = std::fs::canonicalize(path)?.display().to_string();
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let mut known: BTreeMap<String, Entry> = std::fs::read(&self.file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        if let Some(e) = known.get(&key) {
            if e.size == meta.len() && e.mtime_ns == mtime_ns {
                return Ok(e.sha256.clone());
            }
        }
        let sha256 = sha256_file(path)?;
        known.insert(
            key,
            Entry {
                size: meta.len(),
                mtime_ns,
                sha256: sha256.clone(),
            },
        );
        self.store(&known);
        Ok(sha256)
    }

    /// Writes a new file beside the cache and renames it over the cache, so a reader never
    /// sees half a file and a link at the cache's name is replaced, not written through.
    fn store(&self, known: &BTreeMap<String, Entry>) {
        let Some(dir) = self.file.parent() else {
            return;
        };
        let tmp = dir.join(format!("hashes.json.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        if std::fs::create_dir_all(dir).is_err()
            || !crate::output::write_new(&tmp, &serde_json::to_vec(known).unwrap_or_default())
                .unwrap_or(false)
        {
            return;
        }
        if std::fs::rename(&tmp, &self.file).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}
