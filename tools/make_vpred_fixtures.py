"""v-prediction and no-CFG txt2img references on the tiny model: k-diffusion's
CompVisVDenoiser (Euler, Euler a, DPM++ 2M) and diffusers' DDIM with
`prediction_type="v_prediction"`, plus guidance scale 0 (diffusers and SD-Turbo: the
conditional prediction alone, no unconditional pass) for ε and v, and SD-Turbo-style runs:
Euler a over A1111's "SGM Uniform" sigmas in 1 and 4 steps without guidance.

    /opt/venv/bin/python tools/make_vpred_fixtures.py

The tiny UNet is the SD1 fixture's; only the meaning of its output changes. Conventions as
tools/txt2img_ref.py (one generator per image: initial noise, then sampler noise)."""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kdiff  # noqa: E402
from make_fixtures import REF, SD1_SCHEDULER, image_stats, tokenizer, versions  # noqa: E402
from make_img2img_fixtures import load_models  # noqa: E402
from txt2img_ref import NEGATIVE, PROMPT, SCALE, STEPS, encode  # noqa: E402

OUT = os.path.join(REF, "vpred")
SEED = 42
# name -> (prediction, sampler, cfg, schedule, steps)
CASES = {
    "v_euler": ("v", "euler", 7.5, "normal", STEPS),
    "v_euler_a": ("v", "euler_a", 7.5, "normal", STEPS),
    "v_dpmpp_2m": ("v", "dpmpp_2m", 7.5, "normal", STEPS),
    "v_ddim": ("v", "ddim", 7.5, "normal", STEPS),
    "v_euler_a_cfg0": ("v", "euler_a", 0.0, "normal", STEPS),
    "eps_euler_a_cfg0": ("eps", "euler_a", 0.0, "normal", STEPS),
    "turbo_1step": ("eps", "euler_a", 0.0, "sgm_uniform", 1),
    "turbo_4steps": ("eps", "euler_a", 0.0, "sgm_uniform", 4),
}


class Model(torch.nn.Module):
    """`apply_model(x, t)`: the UNet output with CFG over [uncond, cond], or the conditional
    output alone at a scale of at most 1 (diffusers' `do_classifier_free_guidance`)."""

    def __init__(self, unet, alphas_cumprod, uncond, cond, cfg):
        super().__init__()
        self.unet, self.alphas_cumprod, self.cfg = unet, alphas_cumprod, cfg
        self.uncond, self.cond = uncond, cond

    def apply_model(self, x, t, cond=None):
        if self.cfg <= 1.0:
            return self.unet(x, t, encoder_hidden_states=self.cond).sample
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample
        u, c = out.chunk(2)
        return u + self.cfg * (c - u)


def sgm_uniform(den, n):
    """A1111's `sgm_uniform` scheduler (modules/sd_schedulers.py)."""
    start = den.sigma_to_t(den.sigma_max.clone())
    end = den.sigma_to_t(den.sigma_min.clone())
    sigs = [den.t_to_sigma(ts) for ts in torch.linspace(start, end, n + 1)[:-1]]
    return torch.FloatTensor(sigs + [0.0])


def k_sample(ks, kext, model, prediction, sampler, schedule, steps, noise, gen):
    wrap = kext.CompVisVDenoiser if prediction == "v" else kext.CompVisDenoiser
    den = wrap(model, quantize=False)
    sigmas = sgm_uniform(den, steps) if schedule == "sgm_uniform" else den.get_sigmas(steps)
    x = noise * sigmas[0]
    if prediction == "v":
        # CompVisVDenoiser.get_v takes a positional `cond`; the model carries its own.
        den.get_v = lambda x, t, cond=None, **kw: model.apply_model(x, t)  # noqa: E731
    if sampler == "euler":
        return ks.sample_euler(den, x, sigmas, disable=True)
    if sampler == "euler_a":
        ns = lambda s, sn: torch.randn(x.shape, generator=gen)  # noqa: E731
        return ks.sample_euler_ancestral(den, x, sigmas, disable=True, noise_sampler=ns)
    if sampler == "dpmpp_2m":
        return ks.sample_dpmpp_2m(den, x, sigmas, disable=True)
    raise ValueError(sampler)


def ddim(unet, vae, clip, tok, noise, gen, cfg):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler(**{**SD1_SCHEDULER, "prediction_type": "v_prediction"})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=clip, tokenizer=tok, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=STEPS,
        guidance_scale=cfg, generator=gen, latents=noise, output_type="np",
    ).images[0]
    return (img * 255).round().astype(np.uint8)


def main():
    from diffusers import DDIMScheduler

    ks, kext = kdiff.load()
    os.makedirs(OUT, exist_ok=True)
    unet, vae, clip = load_models()
    tok, _ = tokenizer()
    ac = DDIMScheduler(**SD1_SCHEDULER).alphas_cumprod.float()
    manifest = []
    with torch.no_grad():
        uncond, cond = encode(clip, tok, NEGATIVE), encode(clip, tok, PROMPT)
        for name, (prediction, sampler, cfg, schedule, steps) in CASES.items():
            gen = torch.Generator("cpu").manual_seed(SEED)
            noise = torch.randn((1, 4, 8, 8), generator=gen)
            if sampler == "ddim":
                img = ddim(unet, vae, clip, tok, noise, gen, cfg)
            else:
                model = Model(unet, ac, uncond, cond, cfg)
                lat = k_sample(ks, kext, model, prediction, sampler, schedule, steps, noise, gen)
                x = (vae.decode(lat / SCALE).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
                img = (x * 255).round().astype(np.uint8)
            Image.fromarray(img).save(os.path.join(OUT, f"{name}.png"))
            stats = image_stats(img)
            print(f"  {name}: {stats}")
            manifest.append({
                "name": name, "prediction": prediction, "sampler": sampler, "schedule": schedule,
                "eta": 1.0 if sampler == "euler_a" else 0.0, "seed": SEED, "width": 64, "height": 64,
                "steps": steps, "cfg_scale": cfg, "prompt": PROMPT, "negative_prompt": NEGATIVE,
                "file": f"vpred/{name}.png", "stats": stats,
            })
    with open(os.path.join(REF, "vpred.json"), "w") as f:
        json.dump({"cases": manifest, "versions": versions()}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
