//! The well-known models sdrs can fetch by a short name, and the settings each is meant for.

use crate::sampling::SigmaSchedule;

/// The model used when none is named: SD-Turbo gives an image in one UNet step without the
/// unconditional pass, which on a CPU is seconds against minutes for a 50-step SD 1.5 image,
/// and its fp16 files (2.6 GB) are the smallest download of the three.
pub const DEFAULT_MODEL: &str = "sd-turbo";

/// One repository on the Hub: which of its files make a model sdrs can open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CatalogueEntry {
    /// The short name (`sdrs models pull sd-turbo`).
    pub name: &'static str,
    /// The Hub repository, `owner/name`.
    pub repo: &'static str,
    /// One line on what the model is, for `sdrs models list`.
    pub description: &'static str,
    /// Files fetched into the repository's snapshot folder, which is then a diffusers folder.
    pub files: &'static [&'static str],
    /// Files fetched when the repository has them; a missing one is not an error.
    pub optional_files: &'static [&'static str],
    /// What a request that does not say otherwise should use with this model.
    pub defaults: ModelDefaults,
}

/// The generation settings a model is made for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    /// Sampling steps.
    pub steps: usize,
    /// Classifier-free guidance scale (at most 1: no unconditional pass).
    pub cfg_scale: f64,
    /// The sampler, by A1111's name.
    pub sampler: &'static str,
    /// The sigma schedule of the k-diffusion samplers.
    pub schedule: SigmaSchedule,
    /// Width and height in pixels.
    pub size: usize,
}

/// The settings of CompVis' `txt2img.py`, for models without their own.
pub const CLASSIC_DEFAULTS: ModelDefaults = ModelDefaults {
    steps: 50,
    cfg_scale: 7.5,
    sampler: "PLMS",
    schedule: SigmaSchedule::Normal,
    size: 512,
};

/// A diffusers folder in half precision: the `fp16` variant of each network, with the configs
/// (sdrs has the CLIP vocabulary built in, so of the tokenizer only its configs are needed, which
/// name SD 2's pad token).
const FP16_FOLDER: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
];

const FOLDER_EXTRAS: &[&str] = &["tokenizer/special_tokens_map.json"];

/// An SDXL diffusers folder in half precision: [`FP16_FOLDER`] and the second text encoder
/// with its tokenizer's config (which names its pad token, `!`).
const SDXL_FP16_FOLDER: &[&str] = &[
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
];

const SDXL_FOLDER_EXTRAS: &[&str] = &[
    "tokenizer/special_tokens_map.json",
    "tokenizer_2/special_tokens_map.json",
];

/// The models `sdrs models` knows by name.
pub const CATALOGUE: &[CatalogueEntry] = &[
    CatalogueEntry {
        name: "sd-turbo",
        repo: "stabilityai/sd-turbo",
        description: "SD-Turbo: SD 2.1 distilled to 1-4 steps without guidance, 512x512",
        files: FP16_FOLDER,
        optional_files: FOLDER_EXTRAS,
        defaults: ModelDefaults {
            steps: 1,
            cfg_scale: 1.0,
            sampler: "Euler a",
            schedule: SigmaSchedule::SgmUniform,
            size: 512,
        },
    },
    CatalogueEntry {
        name: "sd-1.5",
        repo: "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description: "Stable Diffusion 1.5, 512x512",
        files: FP16_FOLDER,
        optional_files: FOLDER_EXTRAS,
        defaults: CLASSIC_DEFAULTS,
    },
    CatalogueEntry {
        name: "sd-2.1",
        repo: "stabilityai/stable-diffusion-2-1",
        description: "Stable Diffusion 2.1 (v-prediction), 768x768",
        files: FP16_FOLDER,
        optional_files: FOLDER_EXTRAS,
        defaults: ModelDefaults {
            size: 768,
            ..CLASSIC_DEFAULTS
        },
    },
    CatalogueEntry {
        name: "sdxl",
        repo: "stabilityai/stable-diffusion-xl-base-1.0",
        description: "SDXL base 1.0, 1024x1024",
        files: SDXL_FP16_FOLDER,
        optional_files: SDXL_FOLDER_EXTRAS,
        defaults: ModelDefaults {
            steps: 30,
            cfg_scale: 7.0,
            sampler: "DPM++ 2M",
            schedule: SigmaSchedule::Karras,
            size: 1024,
        },
    },
    CatalogueEntry {
        name: "sdxl-turbo",
        repo: "stabilityai/sdxl-turbo",
        description: "SDXL-Turbo: SDXL distilled to 1-4 steps without guidance, 512x512",
        files: SDXL_FP16_FOLDER,
        optional_files: SDXL_FOLDER_EXTRAS,
        defaults: ModelDefaults {
            steps: 1,
            cfg_scale: 1.0,
            sampler: "Euler a",
            schedule: SigmaSchedule::SgmUniform,
            size: 512,
        },
    },
];

/// The catalogue entry called `name`.
pub fn find(name: &str) -> Option<&'static CatalogueEntry> {
    CATALOGUE.iter().find(|e| e.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_model_is_in_the_catalogue_and_names_are_unique() {
        assert!(find(DEFAULT_MODEL).is_some());
        for (i, a) in CATALOGUE.iter().enumerate() {
            assert!(CATALOGUE[i + 1..].iter().all(|b| b.name != a.name));
        }
        assert_eq!(find("sd-2.1").unwrap().defaults.steps, 50);
        let sdxl = find("sdxl").unwrap();
        assert_eq!((sdxl.defaults.size, sdxl.defaults.steps), (1024, 30));
        assert!(sdxl
            .files
            .contains(&"text_encoder_2/model.fp16.safetensors"));
        assert!(find("sd-3").is_none());
    }
}
