//! Textual-inversion embeddings: vectors a prompt names by a file's stem, which replace the
//! token embeddings of the name (A1111's `EmbeddingDatabase`). Names are matched on the CLIP
//! token ids of the name, longest first, so a name that is also a word is the embedding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use serde::Serialize;

use crate::limits::{exceeded, MAX_EMBEDDING_DEPTH, MAX_EMBEDDING_FILES};
use crate::tokenizer::Tokenizer;
use crate::weights::embedding_file;
use crate::weights::file_hash::{sha256_file, HashCache};
use crate::{Error, Result};

/// The file extensions an embeddings folder scan reads (compared without case).
pub const EXTENSIONS: [&str; 3] = ["pt", "bin", "safetensors"];

/// What is known about an embedding file: the listing `/sdapi/v1/embeddings` gives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbeddingInfo {
    /// The name prompts use: the file's stem.
    pub name: String,
    /// The file it came from.
    pub path: PathBuf,
    /// How many token positions it takes.
    pub vectors: usize,
    /// The width of each vector (A1111's `shape`): 768 for SD 1.x, 1024 for SD 2.x.
    pub width: usize,
    /// Training steps, when the file says.
    pub step: Option<i64>,
    /// The hash of the checkpoint it was trained on, when the file says.
    pub sd_checkpoint: Option<String>,
    /// The name of the checkpoint it was trained on, when the file says.
    pub sd_checkpoint_name: Option<String>,
    /// The SHA-256 of the file, when it could be read.
    pub sha256: Option<String>,
}

impl EmbeddingInfo {
    /// A1111's short hash for `TI hashes`: the first 12 hex digits of the file's SHA-256.
    pub fn shorthash(&self) -> Option<&str> {
        self.sha256.as_deref().and_then(|h| h.get(..12))
    }
}

/// One loaded embedding: what it is, and its vectors.
#[derive(Debug)]
pub struct Embedding {
    /// The file's facts.
    pub info: EmbeddingInfo,
    /// `[vectors, width]`, float32, on the CPU.
    pub vectors: Tensor,
}

impl PartialEq for Embedding {
    fn eq(&self, other: &Self) -> bool {
        self.info == other.info
    }
}

/// A file of the embeddings folder that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkippedEmbedding {
    /// The file's stem.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Why it was skipped ("width 1024, the text encoder's is 768", "not an embedding: ...").
    pub reason: String,
    /// What the file holds, when it is an embedding (of another model's width, say).
    pub info: Option<EmbeddingInfo>,
}

/// The embeddings a model's prompts can name, and the files that were skipped.
#[derive(Debug, Default)]
pub struct Embeddings {
    loaded: Vec<Arc<Embedding>>,
    skipped: Vec<SkippedEmbedding>,
    /// First token id of a name → (the name's ids, index in `loaded`), longest first.
    lookup: HashMap<u32, Vec<(Vec<u32>, usize)>>,
}

impl Embeddings {
    /// The embedding files of `dir` and its subfolders (at most [`MAX_EMBEDDING_DEPTH`] deep,
    /// [`MAX_EMBEDDING_FILES`] files), for a text encoder of `width`: files of another width,
    /// unreadable ones and repeated names are listed as skipped. Fails only when `dir` cannot
    /// be read or holds too many files.
    pub fn load_dir(dir: &Path, tokenizer: &Tokenizer, width: usize) -> Result<Self> {
        Ok(Self::load_files(&scan(dir)?, tokenizer, width))
    }

    /// The embeddings in `paths`, in order (a name already loaded skips its later files).
    pub fn load_files(paths: &[PathBuf], tokenizer: &Tokenizer, width: usize) -> Self {
        let hashes = HashCache::default_location();
        let mut db = Self::default();
        let mut skipped = Vec::new();
        for path in paths {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut skip = |reason: String, info: Option<EmbeddingInfo>| {
                skipped.push(SkippedEmbedding {
                    name: name.clone(),
                    path: path.clone(),
                    reason,
                    info,
                });
            };
            let file = match embedding_file::read(path) {
                Ok(file) => file,
                Err(reason) => {
                    skip(format!("not an embedding: {reason}"), None);
                    continue;
                }
            };
            let (vectors, file_width) = file.vectors.dims2().unwrap_or((0, 0));
            let sha256 = match &hashes {
                Some(cache) => cache.sha256(path),
                None => sha256_file(path),
            }
            .ok();
            let info = EmbeddingInfo {
                name: name.clone(),
                path: path.clone(),
                vectors,
                width: file_width,
                step: file.step,
                sd_checkpoint: file.sd_checkpoint,
                sd_checkpoint_name: file.sd_checkpoint_name,
                sha256,
            };
            if file_width != width {
                skip(
                    format!("width {file_width}, the text encoder's is {width}"),
                    Some(info),
                );
                continue;
            }
            if db.get(&name).is_some() {
                skip("another file has this name".into(), Some(info));
                continue;
            }
            let ids = tokenizer.encode(&name);
            let Some(&first) = ids.first() else {
                skip("the name has no tokens".into(), Some(info));
                continue;
            };
            let index = db.loaded.len();
            db.loaded.push(Arc::new(Embedding {
                info,
                vectors: file.vectors,
            }));
            let entries = db.lookup.entry(first).or_default();
            entries.push((ids, index));
            // Stable: of names with the same ids, the first loaded is matched (A1111's sort).
            entries.sort_by_key(|(ids, _)| std::cmp::Reverse(ids.len()));
        }
        db.skipped = skipped;
        db
    }

    /// The loaded embeddings, in load order.
    pub fn loaded(&self) -> &[Arc<Embedding>] {
        &self.loaded
    }

    /// The files that were not loaded, and why.
    pub fn skipped(&self) -> &[SkippedEmbedding] {
        &self.skipped
    }

    /// The loaded embedding called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Embedding>> {
        self.loaded.iter().find(|e| e.info.name == name)
    }

    /// Whether no embedding is loaded.
    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty()
    }

    /// The embedding whose name's ids start at `tokens[at]`, and how many ids the name takes
    /// (A1111's `find_embedding_at_position`: the longest name that matches).
    pub fn find_at(&self, tokens: &[u32], at: usize) -> Option<(&Arc<Embedding>, usize)> {
        let candidates = self.lookup.get(tokens.get(at)?)?;
        candidates.iter().find_map(|(ids, index)| {
            let end = at.checked_add(ids.len())?;
            (tokens.get(at..end)? == ids.as_slice()).then(|| (&self.loaded[*index], ids.len()))
        })
    }
}

/// The embedding files under `dir`, sorted by path within each folder, folders after files.
fn scan(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut visited = 0usize;
    // Explicit stack of (folder, depth): no recursion on the file system's nesting.
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((folder, depth)) = stack.pop() {
        let entries = std::fs::read_dir(&folder).map_err(|e| Error::io(&folder, e))?;
        let mut files = Vec::new();
        let mut folders = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&folder, e))?;
            visited += 1;
            if visited > MAX_EMBEDDING_FILES {
                return Err(exceeded(
                    format!("files in embeddings folder {}", dir.display()),
                    format!("more than {MAX_EMBEDDING_FILES}"),
                    "MAX_EMBEDDING_FILES",
                    MAX_EMBEDDING_FILES,
                ));
            }
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            // `metadata` follows links, as A1111's `os.walk(followlinks=True)` does; the depth
            // bound keeps a link loop finite.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if hidden {
                continue;
            }
            if meta.is_dir() {
                if depth < MAX_EMBEDDING_DEPTH {
                    folders.push(path);
                }
            } else if meta.len() > 0 && has_embedding_extension(&path) {
                files.push(path);
            }
        }
        files.sort();
        found.extend(files);
        folders.sort();
        // Popped in sorted order.
        stack.extend(folders.into_iter().rev().map(|f| (f, depth + 1)));
    }
    Ok(found)
}

fn has_embedding_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}
