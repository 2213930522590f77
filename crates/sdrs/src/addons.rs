//! Where add-ons (embeddings, LoRAs) live when nobody says: beside the model folder, as
//! A1111 keeps `models/`, `loras/` and `embeddings/` side by side.

use std::path::{Path, PathBuf};

/// The folder `folder` (such as `loras`) beside `model_folder`, the folder models are kept
/// in: `data/models` → `data/loras`, `models` → `./loras`. Whether it exists is for the
/// caller to check.
pub fn addon_dir(model_folder: &Path, folder: &str) -> PathBuf {
    let parent = match model_folder.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent.join(folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folder_is_beside_the_model_folder() {
        let dir = |p: &str| addon_dir(Path::new(p), "embeddings");
        assert_eq!(dir("data/models"), Path::new("data/embeddings"));
        assert_eq!(dir("data/models/"), Path::new("data/embeddings"));
        assert_eq!(dir("models"), Path::new("./embeddings"));
    }
}
