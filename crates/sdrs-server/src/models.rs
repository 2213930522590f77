//! The checkpoints a server can switch between: `--model` and what `--models-dir` holds.

use std::path::{Path, PathBuf};

/// A checkpoint the server offers, named as A1111 names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// The name clients see and send back in `sd_model_checkpoint`: the file's path relative
    /// to the models folder (or its file name).
    pub title: String,
    /// The title without its extension.
    pub model_name: String,
    pub path: PathBuf,
}

impl ModelEntry {
    pub fn from_path(path: &Path, root: Option<&Path>) -> Self {
        let relative = root
            .and_then(|r| path.strip_prefix(r).ok())
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new(path.file_name().unwrap_or(path.as_os_str())));
        let title = relative.to_string_lossy().replace('\\', "/");
        let model_name = match (relative.extension(), title.rsplit_once('.')) {
            (Some(_), Some((stem, _))) => stem.to_string(),
            _ => title.clone(),
        };
        Self {
            title,
            model_name,
            path: path.to_path_buf(),
        }
    }
}

/// Whether `path` looks like something `Checkpoint::open` takes.
fn is_checkpoint(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("model_index.json").is_file() || path.join("unet").is_dir();
    }
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("safetensors" | "ckpt" | "pt" | "pth")
    ) && !is_upscaler_or_vae(path)
}

/// VAEs and upscalers often sit beside checkpoints; their names say what they are.
fn is_upscaler_or_vae(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    name.contains(".vae.") || name.contains("esrgan") || name.ends_with(".pth")
}

/// The models of `--model` and of `--models-dir` (searched two levels deep), sorted by title.
pub fn list(model: Option<&Path>, dir: Option<&Path>) -> Vec<ModelEntry> {
    let mut found = Vec::new();
    if let Some(dir) = dir {
        collect(dir, dir, 2, &mut found);
    }
    if let Some(model) = model {
        let entry = ModelEntry::from_path(model, dir);
        if !found.iter().any(|e| e.path == entry.path) {
            found.push(entry);
        }
    }
    found.sort_by(|a, b| a.title.cmp(&b.title));
    found
}

/// Folders of add-ons that sit among checkpoints (sdrs' and A1111's names); their files are
/// never offered as checkpoints.
const ADDON_FOLDERS: [&str; 4] = ["loras", "lora", "lycoris", "embeddings"];

fn is_addon_folder(path: &Path) -> bool {
    path.file_name().is_some_and(|name| {
        ADDON_FOLDERS
            .iter()
            .any(|f| name.to_string_lossy().eq_ignore_ascii_case(f))
    })
}

fn collect(root: &Path, dir: &Path, depth: usize, found: &mut Vec<ModelEntry>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.is_dir() && is_addon_folder(&path) {
            continue;
        }
        if is_checkpoint(&path) {
            found.push(ModelEntry::from_path(&path, Some(root)));
        } else if path.is_dir() && depth > 1 {
            collect(root, &path, depth - 1, found);
        }
    }
}

/// The model a client named: its title, model name or file name, with or without A1111's
/// ` [hash]` suffix.
pub fn find<'a>(models: &'a [ModelEntry], name: &str) -> Option<&'a ModelEntry> {
    let name = name.trim();
    let name = match name.rsplit_once(" [") {
        Some((base, hash)) if hash.ends_with(']') => base,
        _ => name,
    };
    models.iter().find(|m| {
        m.title == name
            || m.model_name == name
            || m.path.to_string_lossy() == name
            || m.path
                .file_name()
                .is_some_and(|f| f.to_string_lossy() == name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_found_in_the_folder_and_named_relative_to_it() {
        let dir = std::env::temp_dir().join(format!("sdrs-models-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub/folder-model/unet")).unwrap();
        std::fs::write(dir.join("a.safetensors"), b"").unwrap();
        std::fs::write(dir.join("sub/b.ckpt"), b"").unwrap();
        std::fs::write(dir.join("notes.txt"), b"").unwrap();
        std::fs::write(dir.join("x.vae.safetensors"), b"").unwrap();
        std::fs::write(dir.join("RealESRGAN_x4plus.pth"), b"").unwrap();
        for addons in ["loras", "embeddings", "Lora"] {
            std::fs::create_dir_all(dir.join(addons)).unwrap();
            std::fs::write(dir.join(addons).join("style.safetensors"), b"").unwrap();
        }
        let extra = std::env::temp_dir().join("elsewhere.safetensors");
        let models = list(Some(&extra), Some(&dir));
        let titles: Vec<_> = models.iter().map(|m| m.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "a.safetensors",
                "elsewhere.safetensors",
                "sub/b.ckpt",
                "sub/folder-model"
            ]
        );
        assert_eq!(models[2].model_name, "sub/b");
        assert_eq!(models[3].model_name, "sub/folder-model");
        assert_eq!(find(&models, "sub/b").unwrap().title, "sub/b.ckpt");
        assert_eq!(
            find(&models, "a.safetensors [0123456789]").unwrap().title,
            "a.safetensors"
        );
        assert_eq!(find(&models, "b.ckpt").unwrap().title, "sub/b.ckpt");
        assert!(find(&models, "missing").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
