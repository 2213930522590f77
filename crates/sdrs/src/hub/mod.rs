//! Finding a model by name: a path, the local model folder, or the Hugging Face Hub's cache,
//! downloading catalogue models into that cache when they are not there.

pub mod catalogue;
mod download;

use std::path::{Path, PathBuf};

pub use catalogue::{CatalogueEntry, ModelDefaults, CATALOGUE, DEFAULT_MODEL};
pub use download::Progress;

use crate::{Error, Result};

/// Where models are looked for and fetched from.
#[derive(Debug, Clone)]
pub struct Hub {
    /// The Hub's address (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The Hub cache, `$HF_HOME/hub` (`~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Sent as a bearer token (`HF_TOKEN`, else the token file `huggingface-cli login` writes).
    pub token: Option<String>,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Models put there by hand, by name: `NAME/`, `NAME.safetensors` or `NAME.ckpt`
    /// (`SDRS_MODEL_DIR`, else `~/.local/share/sdrs/models`).
    pub model_dir: PathBuf,
    /// The model used when none is named (`SDRS_DEFAULT_MODEL`, else [`DEFAULT_MODEL`]).
    pub default_model: String,
}

/// A model found on disk, and its catalogue entry when it came by a catalogue name.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The model file or folder.
    pub path: PathBuf,
    /// Its catalogue entry, when it was named by one (its settings become the defaults).
    pub entry: Option<&'static CatalogueEntry>,
}

/// Where a model name leads without downloading anything.
#[derive(Debug, Clone)]
pub enum Located {
    /// The model is there to open.
    OnDisk(ResolvedModel),
    /// A catalogue model not (completely) in the Hub cache.
    Missing(&'static CatalogueEntry),
}

impl Located {
    /// The catalogue entry the name came by, if it did.
    pub fn entry(&self) -> Option<&'static CatalogueEntry> {
        match self {
            Located::OnDisk(model) => model.entry,
            Located::Missing(entry) => Some(entry),
        }
    }
}

impl Hub {
    /// The configuration the environment gives, as the Python tools read it.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let home = var("HOME").map(PathBuf::from).unwrap_or_default();
        let hf_home = var("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| var("XDG_CACHE_HOME").map(|d| Path::new(&d).join("huggingface")))
            .unwrap_or_else(|| home.join(".cache").join("huggingface"));
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let model_dir = var("SDRS_MODEL_DIR").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_DATA_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".local").join("share"))
                .join("sdrs")
                .join("models")
        });
        Hub {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            token,
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| v != "0"),
            model_dir,
            default_model: var("SDRS_DEFAULT_MODEL").unwrap_or_else(|| DEFAULT_MODEL.into()),
        }
    }

    /// The model `name` refers to (the default model when `None`), downloaded first when it is
    /// a catalogue model missing from the Hub cache (see [`Hub::locate`]).
    pub fn resolve(
        &self,
        name: Option<&str>,
        progress: &mut dyn Progress,
    ) -> Result<ResolvedModel> {
        match self.locate(name)? {
            Located::OnDisk(model) => Ok(model),
            Located::Missing(entry) => Ok(ResolvedModel {
                path: self.pull(entry, progress)?,
                entry: Some(entry),
            }),
        }
    }

    /// Where `name` (the default model when `None`) leads, in this order: an existing path; a
    /// model of that name in the model folder; a catalogue model in the Hub cache; a catalogue
    /// model still to download. Anything else is an error that says so.
    pub fn locate(&self, name: Option<&str>) -> Result<Located> {
        let name = name.unwrap_or(&self.default_model);
        let entry = catalogue::find(name);
        let as_path = Path::new(name);
        if as_path.exists() {
            return Ok(Located::OnDisk(ResolvedModel {
                path: as_path.to_path_buf(),
                entry: None,
            }));
        }
        if let Some(path) = self.local(name) {
            return Ok(Located::OnDisk(ResolvedModel { path, entry }));
        }
        let looks_like_a_path = name.contains(['/', '\\'])
            || [".safetensors", ".ckpt", ".pt", ".pth", ".bin"]
                .iter()
                .any(|ext| name.ends_with(ext));
        if entry.is_none() && looks_like_a_path {
            // The system's own words for why the path is not there.
            let cause = std::fs::metadata(as_path)
                .err()
                .unwrap_or_else(|| std::io::ErrorKind::NotFound.into());
            return Err(Error::io(as_path, cause));
        }
        let Some(entry) = entry else {
            return Err(Error::UnknownModel {
                name: name.into(),
                hint: self.where_to_put(name),
            });
        };
        Ok(match self.cached(entry) {
            Some(path) => Located::OnDisk(ResolvedModel {
                path,
                entry: Some(entry),
            }),
            None => Located::Missing(entry),
        })
    }

    /// The settings the model `name` leads to is made for: its catalogue entry's, else
    /// CompVis' (also when the name leads nowhere, which loading will report).
    pub fn defaults(&self, name: Option<&str>) -> ModelDefaults {
        self.locate(name)
            .ok()
            .and_then(|l| l.entry())
            .map_or(catalogue::CLASSIC_DEFAULTS, |e| e.defaults)
    }

    /// `name` in the model folder, as a folder or a single file.
    pub fn local(&self, name: &str) -> Option<PathBuf> {
        if name.is_empty() || name.contains(['/', '\\']) {
            return None;
        }
        [
            self.model_dir.join(name),
            self.model_dir.join(format!("{name}.safetensors")),
            self.model_dir.join(format!("{name}.ckpt")),
        ]
        .into_iter()
        .find(|p| p.exists())
    }

    /// The snapshot folder of `entry` in the Hub cache when every file it needs is there.
    pub fn cached(&self, entry: &CatalogueEntry) -> Option<PathBuf> {
        download::cached_snapshot(self, entry)
    }

    /// Downloads what `entry` lacks into the Hub cache; returns its snapshot folder.
    pub fn pull(&self, entry: &CatalogueEntry, progress: &mut dyn Progress) -> Result<PathBuf> {
        if self.offline {
            return Err(Error::Download {
                model: entry.name.into(),
                tried: format!(
                    "nothing: HF_HUB_OFFLINE is set, and {} is not complete in the Hub cache {}",
                    entry.repo,
                    self.cache_dir.display()
                ),
                hint: self.where_to_put(entry.name),
            });
        }
        download::pull(self, entry, progress).map_err(|reason| Error::Download {
            model: entry.name.into(),
            tried: format!(
                "{}/{} into {}: {reason}",
                self.endpoint,
                entry.repo,
                self.cache_dir.display()
            ),
            hint: self.where_to_put(entry.name),
        })
    }

    /// Deletes `entry`'s files from the Hub cache (their snapshot links and the blobs behind
    /// them, not other files of the repository); returns the bytes freed.
    pub fn remove(&self, entry: &CatalogueEntry) -> Result<u64> {
        download::remove(self, entry)
    }

    /// Where a user can put `name` by hand.
    fn where_to_put(&self, name: &str) -> String {
        format!(
            "put a checkpoint at {} (or a diffusers folder at {}), or pass --model PATH",
            self.model_dir.join(format!("{name}.safetensors")).display(),
            self.model_dir.join(name).display()
        )
    }
}
