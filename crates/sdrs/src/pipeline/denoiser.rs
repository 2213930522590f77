//! The denoiser the samplers see: UNet ε-prediction, classifier-free guidance over the
//! prompt's AND parts (composable diffusion), its prompt edits, and the k-diffusion
//! scalings between sigma space and the UNet's input.

use candle_core::Tensor;

use super::conditioning::{Conditioning, UnetCondition};
use super::StableDiffusion;
use crate::models::unet::Prediction;
use crate::sampling::Denoiser;
use crate::Result;

/// `D(x, σ)` for an ε- or v-predicting UNet with classifier-free guidance (k-diffusion's
/// `CompVisDenoiser` / `CompVisVDenoiser` around A1111's `CFGDenoiser`).
pub struct CfgDenoiser<'a> {
    /// Asked for its UNet at each call, so that no UNet is held between steps (with one network
    /// resident at a time, the VAE's turn can then free it).
    sd: &'a StableDiffusion,
    conditioning: &'a Conditioning,
    cfg_scale: f64,
}

impl<'a> CfgDenoiser<'a> {
    /// A guided denoiser around `sd`'s UNet (predicting `sd.prediction`).
    pub fn new(sd: &'a StableDiffusion, conditioning: &'a Conditioning, cfg_scale: f64) -> Self {
        Self {
            sd,
            conditioning,
            cfg_scale,
        }
    }

    /// The UNet's output under each condition: one batched call when they batch (the usual
    /// case), else one call per condition (prompts of different chunk counts).
    fn output_per_condition(
        &self,
        x_in: &Tensor,
        t: f64,
        conditions: &[&UnetCondition],
    ) -> Result<Vec<Tensor>> {
        let unet = self.sd.unet()?;
        if !UnetCondition::batchable(conditions) {
            return conditions
                .iter()
                .map(|c| c.forward(&unet, x_in, t))
                .collect();
        }
        let batch = x_in.dim(0)?;
        let xs = vec![x_in; conditions.len()];
        let out = UnetCondition::cat(conditions)?.forward(&unet, &Tensor::cat(&xs, 0)?, t)?;
        (0..conditions.len())
            .map(|i| Ok(out.narrow(0, i * batch, batch)?))
            .collect()
    }

    /// `ε_u + Σ_i w_i · s · (ε_i − ε_u)` (A1111's `combine_denoised`, in the UNet's output,
    /// which is linear in the denoised latent for ε and v alike).
    /// `step` picks each part's scheduled prompt.
    fn guided_output(&self, x_in: &Tensor, t: f64, step: usize) -> Result<Tensor> {
        let parts = &self.conditioning.parts;
        if self.conditioning.unguided(self.cfg_scale) {
            return parts[0].at(step).forward(&*self.sd.unet()?, x_in, t);
        }
        let mut conditions = vec![self.conditioning.uncond.at(step)];
        conditions.extend(parts.iter().map(|p| p.at(step)));
        let eps = self.output_per_condition(x_in, t, &conditions)?;
        let uncond = &eps[0];
        let mut guided = uncond.clone();
        for (part, cond) in parts.iter().zip(&eps[1..]) {
            guided = (guided + ((cond - uncond)? * (part.weight as f64 * self.cfg_scale))?)?;
        }
        Ok(guided)
    }
}

impl Denoiser for CfgDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f64, step: usize) -> Result<Tensor> {
        let c_in = 1.0 / (sigma * sigma + 1.0).sqrt();
        let t = self.sd.schedule.sigma_to_t(sigma);
        let out = self.guided_output(&(x * c_in)?, t, step)?;
        match self.sd.prediction {
            Prediction::Epsilon => Ok((x - (out * sigma)?)?),
            // c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1) (k-diffusion's CompVisVDenoiser).
            Prediction::V => Ok(((x * (c_in * c_in))? - (out * (sigma * c_in))?)?),
        }
    }
}
