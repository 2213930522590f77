//! Bounds on the model configs, whether read from a diffusers `config.json` or inferred from a
//! single file's tensors: checked when a checkpoint opens, before any name table is built or
//! any layer looped over. Errors name the field, its value and the limit.

use crate::limits::{
    exceeded, MAX_CHANNELS, MAX_CLIP_LAYERS, MAX_LAYERS_PER_BLOCK, MAX_POSITIONS,
    MAX_TRANSFORMER_DEPTH, MAX_UNET_LEVELS, MAX_VAE_LEVELS, MAX_VOCAB,
};
use crate::models::clip::ClipConfig;
use crate::models::unet::{PerBlock, UNetConfig};
use crate::models::vae::VaeConfig;
use crate::{Error, Result};

use super::numbered::Limit;

const CHANNELS: Limit = ("MAX_CHANNELS", MAX_CHANNELS);

/// `value` of `field` (in `model`'s config) must be at least 1 and at most the limit.
fn count(model: &str, field: &str, value: usize, (name, limit): Limit) -> Result<()> {
    if value == 0 {
        return Err(Error::InvalidConfig(format!(
            "{model} {field} is 0; it must be at least 1"
        )));
    }
    if value > limit {
        return Err(exceeded(format!("{model} {field}"), value, name, limit));
    }
    Ok(())
}

/// `value` of `field` must be finite and above zero.
fn positive(model: &str, field: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "{model} {field} is {value}; it must be finite and above 0"
        )))
    }
}

/// Every value of a per-block field, and how many it lists.
fn per_block(model: &str, field: &str, value: &PerBlock, limit: Limit) -> Result<()> {
    match value {
        PerBlock::All(v) => count(model, field, *v, limit),
        PerBlock::Each(values) => {
            if values.len() > MAX_UNET_LEVELS {
                return Err(exceeded(
                    format!("{model} {field} length"),
                    values.len(),
                    "MAX_UNET_LEVELS",
                    MAX_UNET_LEVELS,
                ));
            }
            values
                .iter()
                .try_for_each(|&v| count(model, field, v, limit))
        }
    }
}

/// Channel lists: at least one level, at most `levels`, each a channel count.
fn levels(model: &str, channels: &[usize], levels: Limit) -> Result<()> {
    count(model, "block_out_channels length", channels.len(), levels)?;
    channels
        .iter()
        .try_for_each(|&c| count(model, "block_out_channels", c, CHANNELS))
}

impl UNetConfig {
    /// Checks every count and width against [`crate::limits`].
    pub fn validate(&self) -> Result<()> {
        let m = "unet";
        let n_levels = self.block_out_channels.len();
        levels(
            m,
            &self.block_out_channels,
            ("MAX_UNET_LEVELS", MAX_UNET_LEVELS),
        )?;
        if self.down_block_types.len() != n_levels || self.up_block_types.len() != n_levels {
            return Err(Error::InvalidConfig(format!(
                "unet has {n_levels} block_out_channels but {} down_block_types and {} \
                 up_block_types",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        count(m, "in_channels", self.in_channels, CHANNELS)?;
        count(m, "out_channels", self.out_channels, CHANNELS)?;
        count(m, "cross_attention_dim", self.cross_attention_dim, CHANNELS)?;
        count(m, "norm_num_groups", self.norm_num_groups, CHANNELS)?;
        count(
            m,
            "layers_per_block",
            self.layers_per_block,
            ("MAX_LAYERS_PER_BLOCK", MAX_LAYERS_PER_BLOCK),
        )?;
        per_block(m, "attention_head_dim", &self.attention_head_dim, CHANNELS)?;
        if let Some(heads) = &self.num_attention_heads {
            per_block(m, "num_attention_heads", heads, CHANNELS)?;
        }
        per_block(
            m,
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
            ("MAX_TRANSFORMER_DEPTH", MAX_TRANSFORMER_DEPTH),
        )?;
        positive(m, "norm_eps", self.norm_eps)?;
        // diffusers uses 0 or 1 for both; larger values only make the model wrong or huge.
        if self.freq_shift > 1 || self.downsample_padding > 1 {
            return Err(Error::InvalidConfig(format!(
                "unet freq_shift {} and downsample_padding {} must each be 0 or 1",
                self.freq_shift, self.downsample_padding
            )));
        }
        Ok(())
    }
}

impl VaeConfig {
    /// Checks every count and width against [`crate::limits`], and the latent scaling.
    pub fn validate(&self) -> Result<()> {
        let m = "vae";
        levels(
            m,
            &self.block_out_channels,
            ("MAX_VAE_LEVELS", MAX_VAE_LEVELS),
        )?;
        count(m, "in_channels", self.in_channels, CHANNELS)?;
        count(m, "out_channels", self.out_channels, CHANNELS)?;
        count(m, "latent_channels", self.latent_channels, CHANNELS)?;
        count(m, "norm_num_groups", self.norm_num_groups, CHANNELS)?;
        count(
            m,
            "layers_per_block",
            self.layers_per_block,
            ("MAX_LAYERS_PER_BLOCK", MAX_LAYERS_PER_BLOCK),
        )?;
        // Latents are divided by it after encoding: 0 gives infinities, then a black image.
        positive(m, "scaling_factor", self.scaling_factor)
    }
}

impl ClipConfig {
    /// Checks every count and width against [`crate::limits`].
    pub fn validate(&self) -> Result<()> {
        let m = "text_encoder";
        count(m, "vocab_size", self.vocab_size, ("MAX_VOCAB", MAX_VOCAB))?;
        count(m, "hidden_size", self.hidden_size, CHANNELS)?;
        count(m, "intermediate_size", self.intermediate_size, CHANNELS)?;
        count(
            m,
            "num_hidden_layers",
            self.num_hidden_layers,
            ("MAX_CLIP_LAYERS", MAX_CLIP_LAYERS),
        )?;
        count(
            m,
            "max_position_embeddings",
            self.max_position_embeddings,
            ("MAX_POSITIONS", MAX_POSITIONS),
        )?;
        count(m, "num_attention_heads", self.num_attention_heads, CHANNELS)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::InvalidConfig(format!(
                "text_encoder num_attention_heads {} does not divide hidden_size {}",
                self.num_attention_heads, self.hidden_size
            )));
        }
        positive(m, "layer_norm_eps", self.layer_norm_eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sd_configs_pass() {
        UNetConfig::sd1().validate().unwrap();
        VaeConfig::sd().validate().unwrap();
        ClipConfig::sd1().validate().unwrap();
    }

    #[test]
    fn errors_name_the_field_value_and_limit() {
        let mut unet = UNetConfig::sd1();
        unet.layers_per_block = 1_000_000_000;
        let err = unet.validate().unwrap_err().to_string();
        assert!(
            err.contains("layers_per_block is 1000000000") && err.contains("MAX_LAYERS_PER_BLOCK"),
            "{err}"
        );
        let mut vae = VaeConfig::sd();
        vae.scaling_factor = 0.0;
        let err = vae.validate().unwrap_err().to_string();
        assert!(err.contains("scaling_factor is 0"), "{err}");
        vae.scaling_factor = f64::NAN;
        assert!(vae.validate().is_err());
        let mut clip = ClipConfig::sd1();
        clip.num_attention_heads = 0;
        let err = clip.validate().unwrap_err().to_string();
        assert!(err.contains("num_attention_heads is 0"), "{err}");
        let mut unet = UNetConfig::sd1();
        unet.block_out_channels = vec![320; 9];
        let err = unet.validate().unwrap_err().to_string();
        assert!(err.contains("MAX_UNET_LEVELS"), "{err}");
    }
}
