//! Where a model's add-ons (embeddings, LoRAs) live when nobody says: beside the model.

use std::path::{Path, PathBuf};

/// The folder `folder` (such as `embeddings`) in the folder that holds `model_path`, a
/// checkpoint file or a diffusers folder: `models/v1-5.safetensors` → `models/embeddings`,
/// `models/tiny-sd1/` → `models/embeddings`. Whether it exists is for the caller to check.
pub fn addon_dir(model_path: &Path, folder: &str) -> PathBuf {
    let parent = match model_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_is_beside_the_model_file_or_folder() {
        let dir = |p: &str| addon_dir(Path::new(p), "embeddings");
        assert_eq!(
            dir("models/v1-5.safetensors"),
            Path::new("models/embeddings")
        );
        assert_eq!(dir("models/tiny-sd1/"), Path::new("models/embeddings"));
        assert_eq!(dir("model.ckpt"), Path::new("./embeddings"));
    }
}
