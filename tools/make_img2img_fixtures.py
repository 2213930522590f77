"""img2img references on the tiny model: diffusers' StableDiffusionImg2ImgPipeline for DDIM,
k-diffusion samplers with A1111's img2img start for the rest, and PIL/A1111 references for the
init-image preparation (alpha flattening, the three resize modes).

    /opt/venv/bin/python tools/make_img2img_fixtures.py

Conventions (the Rust side reproduces them, see crates/sdrs/src/pipeline/img2img.rs):
- one generator per image, `torch.Generator().manual_seed(seed)`, drawn in this order: the
  VAE posterior sample (`mean + std * randn`), the initial noise, then sampler noise;
- init latent = 0.18215 * sampled latent;
- DDIM: diffusers' img2img (t_enc = min(int(strength * S), S) last DDIM timesteps, add_noise);
- k-samplers: A1111's `sample_img2img`: t_enc = int(min(strength, 0.999) * S), sigmas of the
  full S-step schedule, sigma_sched = sigmas[S - t_enc - 1:], x = init + noise * sigma_sched[0].

Deterministic: re-running rewrites the same bytes."""

import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kdiff  # noqa: E402
from make_fixtures import FIX, REF, SD1_SCHEDULER, image_stats, tokenizer, versions  # noqa: E402
from txt2img_ref import CFG, NEGATIVE, PROMPT, SCALE, STEPS, CfgModel, encode  # noqa: E402

OUT = os.path.join(REF, "img2img")
SEEDS = (42, 7)
STRENGTHS = (0.3, 0.75)
# name -> (sampler, schedule)
CASES = {
    "ddim": ("ddim", "normal"),
    "euler": ("euler", "normal"),
    "euler_a": ("euler_a", "normal"),
    "dpmpp_2m": ("dpmpp_2m", "normal"),
}
LANCZOS = Image.Resampling.LANCZOS


def init_image():
    """A 64x64 RGB picture with smooth gradients and hard edges (deterministic)."""
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    r = 40 + 180 * x / 63
    g = 60 + 120 * (0.5 + 0.5 * np.sin(y / 6.0))
    b = 200 - 150 * y / 63
    disc = (x - 40) ** 2 + (y - 24) ** 2 < 14**2
    r[disc], g[disc], b[disc] = 230, 40, 30
    square = (x > 8) & (x < 26) & (y > 38) & (y < 58)
    r[square], g[square], b[square] = 250, 250, 245
    img = np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def resize_source():
    """A 45x30 RGBA picture with varying alpha, for the flattening and resize references."""
    y, x = np.mgrid[0:30, 0:45].astype(np.float64)
    r = 255 * x / 44
    g = 255 * y / 29
    b = 128 + 100 * np.cos((x + y) / 5.0)
    a = 255 * (0.5 + 0.5 * np.sin(x / 4.0) * np.cos(y / 3.0))
    a[:, :3] = 0
    a[:, -3:] = 255
    img = np.stack([r, g, b, a], axis=-1).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGBA")


def flatten(img):
    """A1111's `images.flatten` with its default background (#ffffff)."""
    bg = Image.new("RGBA", img.size, "#ffffff")
    return Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB")


def resize_image(mode, im, width, height):
    """A1111's `images.resize_image` with Lanczos (no upscaler), modes 0/1/2."""
    if mode == 0:
        return im.resize((width, height), resample=LANCZOS)
    ratio = width / height
    src_ratio = im.width / im.height
    if mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = im.resize((src_w, src_h), resample=LANCZOS)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
        res.paste(
            resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
            box=(0, fill_height + src_h),
        )
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
        res.paste(
            resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
            box=(fill_width + src_w, 0),
        )
    return res


def resize_references():
    src = resize_source()
    src.save(os.path.join(OUT, "resize_src.png"))
    flat = flatten(src)
    flat.save(os.path.join(OUT, "resize_flat.png"))
    cases = []
    for mode, mode_name in enumerate(("just-resize", "crop", "fill")):
        for w, h in ((64, 48), (40, 64), (24, 16)):
            stem = f"resize_{mode_name}_{w}x{h}"
            resize_image(mode, flat, w, h).save(os.path.join(OUT, stem + ".png"))
            cases.append({"mode": mode_name, "width": w, "height": h, "file": f"img2img/{stem}.png"})
    return {"source": "img2img/resize_src.png", "flattened": "img2img/resize_flat.png", "cases": cases}


def load_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = os.path.join(FIX, "tiny-sd1")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae"), torch_dtype=torch.float32).eval()
    clip = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"), dtype=torch.float32).eval()
    return unet, vae, clip


def to_uint8(decoded):
    x = (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return (x * 255).round().astype(np.uint8)


def image_tensor(img):
    """diffusers' VaeImageProcessor: uint8 / 255 in float32, then 2x - 1."""
    a = np.array(img).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(a).permute(2, 0, 1)[None] - 1.0


def ddim_pipeline(unet, vae, clip, tok, init, seed, strength):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        unet=unet,
        scheduler=DDIMScheduler(**SD1_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        PROMPT,
        image=init,
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        eta=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images[0]
    return (img * 255).round().astype(np.uint8)


def k_img2img(ks, kext, unet, vae, ac, uncond, cond, init, sampler, schedule, seed, strength):
    gen = torch.Generator("cpu").manual_seed(seed)
    dist = vae.encode(image_tensor(init)).latent_dist
    latent = SCALE * dist.sample(generator=gen)
    noise = torch.randn(latent.shape, generator=gen)
    den = kext.CompVisDenoiser(CfgModel(unet, ac, uncond, cond), quantize=False)
    if schedule == "karras":
        sigmas = ks.get_sigmas_karras(STEPS, den.sigmas[0].item(), den.sigmas[-1].item(), rho=7.0)
    else:
        sigmas = den.get_sigmas(STEPS)
    t_enc = int(min(strength, 0.999) * STEPS)
    sched = sigmas[STEPS - t_enc - 1 :]
    x = latent + noise * sched[0]
    if sampler == "euler":
        lat = ks.sample_euler(den, x, sched, disable=True)
    elif sampler == "euler_a":
        ns = lambda s, sn: torch.randn(x.shape, generator=gen)  # noqa: E731
        lat = ks.sample_euler_ancestral(den, x, sched, disable=True, noise_sampler=ns)
    elif sampler == "dpmpp_2m":
        lat = ks.sample_dpmpp_2m(den, x, sched, disable=True)
    else:
        raise ValueError(sampler)
    return to_uint8(vae.decode(lat / SCALE).sample)


def strength_zero(vae, init, seed):
    """strength 0: the sampled init latent, decoded."""
    gen = torch.Generator("cpu").manual_seed(seed)
    latent = SCALE * vae.encode(image_tensor(init)).latent_dist.sample(generator=gen)
    return to_uint8(vae.decode(latent / SCALE).sample)


def main():
    from diffusers import DDIMScheduler

    ks, kext = kdiff.load()
    os.makedirs(OUT, exist_ok=True)
    init = init_image()
    init.save(os.path.join(OUT, "init.png"))
    unet, vae, clip = load_models()
    tok, tok_dir = tokenizer()
    ac = DDIMScheduler(**SD1_SCHEDULER).alphas_cumprod.float()
    manifest = []
    with torch.no_grad():
        uncond, cond = encode(clip, tok, NEGATIVE), encode(clip, tok, PROMPT)
        for seed in SEEDS:
            for strength in STRENGTHS:
                for name, (sampler, schedule) in CASES.items():
                    if sampler == "ddim":
                        img = ddim_pipeline(unet, vae, clip, tok, init, seed, strength)
                    else:
                        img = k_img2img(ks, kext, unet, vae, ac, uncond, cond, init, sampler, schedule, seed, strength)
                    manifest.append(case(name, sampler, schedule, seed, strength, img))
            manifest.append(case("strength0", "euler", "normal", seed, 0.0, strength_zero(vae, init, seed)))
    doc = {
        "init": "img2img/init.png",
        "cases": manifest,
        "resize": resize_references(),
        "versions": versions(),
    }
    with open(os.path.join(REF, "img2img.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    shutil.rmtree(tok_dir, ignore_errors=True)


def case(name, sampler, schedule, seed, strength, img):
    stem = f"{name}_s{strength}_seed{seed}"
    Image.fromarray(img).save(os.path.join(OUT, stem + ".png"))
    stats = image_stats(img)
    print(f"  {stem}: {stats}")
    return {
        "name": name,
        "sampler": sampler,
        "schedule": schedule,
        "seed": seed,
        "strength": strength,
        "width": 64,
        "height": 64,
        "steps": STEPS,
        "cfg_scale": CFG,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "file": f"img2img/{stem}.png",
        "stats": stats,
    }


if __name__ == "__main__":
    main()
