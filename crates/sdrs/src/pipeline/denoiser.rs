//! The denoiser the samplers see: UNet ε-prediction, classifier-free guidance over the
//! prompt's AND parts (composable diffusion), the prompt schedule, and the k-diffusion
//! scalings between sigma space and the UNet's input.

use candle_core::Tensor;

use super::conditioning::Conditioning;
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

    /// ε for each context: one batched UNet call when the contexts have the same length (the
    /// usual case), else one call per context (prompts of different chunk counts).
    fn eps_per_context(&self, x_in: &Tensor, t: f64, contexts: &[&Tensor]) -> Result<Vec<Tensor>> {
        let unet = self.sd.unet()?;
        let same_shape = contexts.windows(2).all(|w| w[0].dims() == w[1].dims());
        if !same_shape {
            return contexts.iter().map(|c| unet.forward(x_in, t, c)).collect();
        }
        let batch = x_in.dim(0)?;
        let xs = vec![x_in; contexts.len()];
        let eps = unet.forward(&Tensor::cat(&xs, 0)?, t, &Tensor::cat(contexts, 0)?)?;
        (0..contexts.len())
            .map(|i| Ok(eps.narrow(0, i * batch, batch)?))
            .collect()
    }

    /// `ε_u + Σ_i w_i · s · (ε_i − ε_u)` (A1111's `combine_denoised`, in the UNet's output,
    /// which is linear in the denoised latent for ε and v alike).
    /// `step` picks each part's scheduled prompt.
    fn guided_output(&self, x_in: &Tensor, t: f64, step: usize) -> Result<Tensor> {
        let parts = &self.conditioning.parts;
        if self.conditioning.unguided(self.cfg_scale) {
            return self.sd.unet()?.forward(x_in, t, parts[0].at(step));
        }
        let mut contexts = vec![self.conditioning.uncond.at(step)];
        contexts.extend(parts.iter().map(|p| p.at(step)));
        let eps = self.eps_per_context(x_in, t, &contexts)?;
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
