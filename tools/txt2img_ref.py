"""Whole-pipeline txt2img references: diffusers' StableDiffusionPipeline for DDIM/PLMS and
k-diffusion's samplers for the rest, on the tiny model, with the conventions the Rust side
reproduces (see tools/README.md)."""

import json
import os

import numpy as np
import torch
from PIL import Image

PROMPT = "a tiny red fox in the snow"
NEGATIVE = "blurry"
STEPS = 8
CFG = 7.5
SCALE = 0.18215

# name -> (sampler, schedule, eta)
CASES = {
    "ddim": ("ddim", "normal", 0.0),
    "ddim_eta0.5": ("ddim", "normal", 0.5),
    "plms": ("plms", "normal", 0.0),
    "euler": ("euler", "normal", 0.0),
    "euler_a": ("euler_a", "normal", 1.0),
    "heun": ("heun", "normal", 0.0),
    "dpmpp_2m": ("dpmpp_2m", "normal", 0.0),
    "euler_karras": ("euler", "karras", 0.0),
    "dpmpp_2m_karras": ("dpmpp_2m", "karras", 0.0),
}


def cases():
    """(name, seed, width, height) for every image."""
    out = [(name, seed, 64, 64) for seed in (42, 7) for name in CASES]
    out.append(("euler_a", 42, 80, 48))
    return out


def encode(clip, tok, text):
    ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return clip(ids).last_hidden_state


class CfgModel(torch.nn.Module):
    """What CompVisDenoiser wraps: `apply_model(x, t, cond)` returning the CFG-combined eps
    `u + scale * (c - u)` from one UNet call on the batch [uncond, cond]."""

    def __init__(self, unet, alphas_cumprod, uncond, cond):
        super().__init__()
        self.unet, self.alphas_cumprod = unet, alphas_cumprod
        self.context = torch.cat([uncond, cond])

    def apply_model(self, x, t):
        eps = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=self.context).sample
        u, c = eps.chunk(2)
        return u + CFG * (c - u)


def k_sample(ks, kext, unet, ac, uncond, cond, sampler, schedule, noise, gen, randn=None):
    """`randn(shape)` draws the ancestral samplers' noise; by default `torch.randn` from `gen`
    (tools/make_philox_fixtures.py passes A1111's NV source instead)."""
    if randn is None:
        randn = lambda shape: torch.randn(shape, generator=gen)  # noqa: E731
    den = kext.CompVisDenoiser(CfgModel(unet, ac, uncond, cond), quantize=False)
    if schedule == "karras":
        sigmas = ks.get_sigmas_karras(STEPS, den.sigmas[0].item(), den.sigmas[-1].item(), rho=7.0)
    else:
        sigmas = den.get_sigmas(STEPS)
    x = noise * sigmas[0]
    if sampler == "euler":
        return ks.sample_euler(den, x, sigmas, disable=True)
    if sampler == "euler_a":
        ns = lambda s, sn: randn(x.shape)  # noqa: E731
        return ks.sample_euler_ancestral(den, x, sigmas, disable=True, noise_sampler=ns)
    if sampler == "heun":
        return ks.sample_heun(den, x, sigmas, disable=True)
    if sampler == "dpmpp_2m":
        return ks.sample_dpmpp_2m(den, x, sigmas, disable=True)
    raise ValueError(sampler)


def pipe_sample(unet, vae, clip, tok, sampler, eta, noise, gen, width, height):
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    from make_fixtures import SD1_SCHEDULER, _pndm_cfg

    sched = DDIMScheduler(**SD1_SCHEDULER) if sampler == "ddim" else PNDMScheduler(**_pndm_cfg())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def keep(_pipe, _i, _t, kw):
        seen["latents"] = kw["latents"].clone()
        return kw

    img = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=height,
        width=width,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        eta=eta,
        generator=gen,
        latents=noise,
        output_type="np",
        callback_on_step_end=keep,
    ).images[0]
    return seen["latents"], (img * 255).round().astype(np.uint8)


def run(unet, vae, clip, tok, kext, ref_dir, versions, image_stats):
    import sys

    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    from make_fixtures import SD1_SCHEDULER

    ks = sys.modules["k_diffusion.sampling"]
    ac = DDIMScheduler(**SD1_SCHEDULER).alphas_cumprod.float()
    out_dir = os.path.join(ref_dir, "txt2img")
    os.makedirs(out_dir, exist_ok=True)
    with torch.no_grad():
        uncond, cond = encode(clip, tok, NEGATIVE), encode(clip, tok, PROMPT)
    manifest, latents, worst = [], {}, None
    for name, seed, w, h in cases():
        sampler, schedule, eta = CASES[name]
        gen = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, 4, h // 8, w // 8), generator=gen)
        with torch.no_grad():
            if sampler in ("ddim", "plms"):
                lat, img = pipe_sample(unet, vae, clip, tok, sampler, eta, noise, gen, w, h)
            else:
                lat = k_sample(ks, kext, unet, ac, uncond, cond, sampler, schedule, noise, gen)
                x = vae.decode(lat / SCALE).sample
                x = (x / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
                img = (x * 255).round().astype(np.uint8)
        stem = f"{name}_seed{seed}" + ("" if (w, h) == (64, 64) else f"_{w}x{h}")
        Image.fromarray(img).save(os.path.join(out_dir, stem + ".png"))
        latents[stem] = lat.contiguous()
        stats = image_stats(img)
        print(f"  {stem}: {stats}")
        if worst is None or stats["std"] < worst[1]["std"]:
            worst = (stem, stats)
        manifest.append(
            {
                "name": name,
                "sampler": sampler,
                "schedule": schedule,
                "eta": eta,
                "seed": seed,
                "width": w,
                "height": h,
                "steps": STEPS,
                "cfg_scale": CFG,
                "prompt": PROMPT,
                "negative_prompt": NEGATIVE,
                "file": f"txt2img/{stem}.png",
                "latent_key": stem,
                "stats": stats,
            }
        )
    save_file(latents, os.path.join(ref_dir, "txt2img_latents.safetensors"))
    doc = {"cases": manifest, "versions": versions, "cfg_on": "eps, UNet batch [uncond, cond]"}
    with open(os.path.join(ref_dir, "txt2img.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"  lowest-spread image: {worst}")
