"""Textual-inversion embedding files in the three layouts A1111 and diffusers read, and
references made with diffusers' `pipe.load_textual_inversion`: the text-encoder conditioning of
a few prompts and one DDIM 64x64 8-step txt2img image per model (tiny SD1 folder, tiny SD 2
folder `tiny-sd2-v`, v-prediction).

    /tmp/torchenv/bin/python tools/make_embedding_fixtures.py

Writes tests/fixtures/embeddings/*.{pt,bin,safetensors} (every file's stem is its name) and
reference/embeddings.json, reference/embeddings/*. Names are words no BPE merge spells as
one token, so diffusers (added tokens, matched on the text) and A1111 (matched on the name's
CLIP ids) find them in the same places; what only A1111 does is tested in Rust."""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_fixtures import FIX, REF, SD1_SCHEDULER, tokenizer, versions  # noqa: E402

EMB = os.path.join(FIX, "embeddings")
OUT = os.path.join(REF, "embeddings")
WIDTH = 32  # the tiny text encoders' hidden size (SD1's and the SD 2 one's)
STEPS = 8
CFG = 7.5
SEED = 42

# name -> (layout, vectors)
FILES = {
    "sdrsfox": ("a1111_pt", 2),
    "sdrssnow": ("a1111_safetensors", 3),
    "sdrsred": ("diffusers_bin", 1),
    "sdrsglow": ("diffusers_safetensors", 2),
}
PROMPTS = [
    "a photo of sdrsfox in the snow",
    "sdrsred sdrsglow, a sdrssnow landscape",
    "sdrsglow sdrsfox sdrsred sdrssnow",
]
IMAGE_PROMPT = "a tiny sdrsred fox in the sdrssnow"
IMAGE_NEGATIVE = "sdrsglow blurry"


def write_files():
    os.makedirs(EMB, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    for name, (layout, n) in FILES.items():
        vec = torch.randn((n, WIDTH), generator=gen) * 0.5
        if layout == "a1111_pt":
            # What A1111's Embedding.save writes (the vector trained, so it requires grad).
            torch.save(
                {
                    "string_to_token": {"*": 265},
                    "string_to_param": {"*": vec.clone().requires_grad_(True)},
                    "name": name,
                    "step": 500,
                    "sd_checkpoint": "0123456789",
                    "sd_checkpoint_name": "tiny-sd1",
                },
                os.path.join(EMB, f"{name}.pt"),
            )
        elif layout == "a1111_safetensors":
            save_file({"emb_params": vec.contiguous()}, os.path.join(EMB, f"{name}.safetensors"))
        elif layout == "diffusers_bin":
            # diffusers' learned_embeds.bin: {token: [width]} for one vector.
            torch.save({f"<{name}>": vec[0].clone()}, os.path.join(EMB, f"{name}.bin"))
        else:
            save_file({f"<{name}>": vec.contiguous()}, os.path.join(EMB, f"{name}.safetensors"))
    # Another model's width: listed as skipped.
    save_file({"emb_params": torch.randn((1, 48), generator=gen)}, os.path.join(EMB, "sdrswide.safetensors"))


def pipeline(folder, v):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = os.path.join(FIX, folder)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae"), torch_dtype=torch.float32).eval()
    clip = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"), dtype=torch.float32).eval()
    tok, _ = tokenizer()
    if v:
        tok.pad_token = "!"
    sched = DDIMScheduler(**{**SD1_SCHEDULER, "prediction_type": "v_prediction" if v else "epsilon"})
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
    for name, (layout, _) in FILES.items():
        ext = {"a1111_pt": "pt", "diffusers_bin": "bin"}.get(layout, "safetensors")
        pipe.load_textual_inversion(os.path.join(EMB, f"{name}.{ext}"), token=name)
    return pipe


def main():
    torch.set_num_threads(2)
    write_files()
    os.makedirs(OUT, exist_ok=True)
    cases, tensors = [], {}
    for key, folder, v in (("sd1", "tiny-sd1", False), ("sd2", "tiny-sd2-v", True)):
        pipe = pipeline(folder, v)
        with torch.no_grad():
            for i, prompt in enumerate(PROMPTS):
                # encode_prompt expands a multi-vector name to its tokens itself.
                embeds, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
                tensors[f"{key}.{i}"] = embeds.contiguous()
            gen = torch.Generator("cpu").manual_seed(SEED)
            noise = torch.randn((1, 4, 8, 8), generator=gen)
            img = pipe(
                IMAGE_PROMPT,
                negative_prompt=IMAGE_NEGATIVE,
                height=64,
                width=64,
                num_inference_steps=STEPS,
                guidance_scale=CFG,
                eta=0.0,
                generator=gen,
                latents=noise,
                output_type="np",
            ).images[0]
        file = f"embeddings/{key}_ddim_{SEED}.png"
        Image.fromarray((img * 255).round().astype(np.uint8)).save(os.path.join(REF, file))
        cases.append(
            {
                "model": folder,
                "file": file,
                "prompt": IMAGE_PROMPT,
                "negative_prompt": IMAGE_NEGATIVE,
                "width": 64,
                "height": 64,
                "steps": STEPS,
                "cfg_scale": CFG,
                "sampler": "ddim",
                "schedule": "normal",
                "seed": SEED,
                "eta": 0.0,
            }
        )
    save_file(tensors, os.path.join(OUT, "conditioning.safetensors"))
    manifest = {
        "versions": versions(),
        "embeddings": {name: {"layout": l, "vectors": n} for name, (l, n) in FILES.items()},
        "prompts": PROMPTS,
        "models": {"sd1": "tiny-sd1", "sd2": "tiny-sd2-v"},
        "cases": cases,
    }
    with open(os.path.join(REF, "embeddings.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main()
