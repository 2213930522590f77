"""A tiny SD 2-style single file — the SD1 fixture's UNet and VAE with an OpenCLIP text
encoder (`cond_stage_model.model.*`, fused `in_proj`, GELU, 3 resblocks) — and references:
the conditioning SD 2 uses (penultimate layer, then `ln_final`; prompts padded with "!" = id 0)
computed by transformers' CLIPTextModel on the same weights, and one Euler txt2img image.

    /opt/venv/bin/python tools/make_sd2_fixtures.py

Also the same model as a diffusers folder the way SD 2 repositories ship it (text encoder cut to
the penultimate layer, tokenizer padding with "!", a v-prediction scheduler config; UNet and VAE
linked to tiny-sd1's), with a v-prediction Euler image.

Writes tests/fixtures/tiny-sd2-openclip.safetensors (f16), tests/fixtures/tiny-sd2-v/,
reference/sd2.json and reference/sd2/*."""

import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kdiff  # noqa: E402
from make_fixtures import CLIP_CFG, FIX, REF, SD1_SCHEDULER, make_clip, tokenizer, versions  # noqa: E402
from make_img2img_fixtures import load_models  # noqa: E402
from make_vpred_fixtures import Model, k_sample  # noqa: E402
from txt2img_ref import NEGATIVE, PROMPT, SCALE, STEPS  # noqa: E402

OPEN_CLIP_CFG = dict(CLIP_CFG, hidden_act="gelu", num_hidden_layers=3, num_attention_heads=1)
OUT = os.path.join(REF, "sd2")
FOLDER = os.path.join(FIX, "tiny-sd2-v")


def write_folder(clip):
    """The diffusers SD 2 layout: a text encoder one layer shorter, "!" padding, v-prediction."""
    from transformers import CLIPTextConfig, CLIPTextModel

    shutil.rmtree(FOLDER, ignore_errors=True)
    src = os.path.join(FIX, "tiny-sd1")
    for part in ("unet", "vae"):
        os.makedirs(FOLDER, exist_ok=True)
        os.symlink(os.path.join("..", "tiny-sd1", part), os.path.join(FOLDER, part))
    shutil.copy(os.path.join(src, "model_index.json"), FOLDER)
    os.makedirs(os.path.join(FOLDER, "scheduler"))
    with open(os.path.join(src, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    sched["prediction_type"] = "v_prediction"
    with open(os.path.join(FOLDER, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=1)
    os.makedirs(os.path.join(FOLDER, "tokenizer"))
    with open(os.path.join(src, "tokenizer", "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    tok_cfg["pad_token"] = "!"
    with open(os.path.join(FOLDER, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump(tok_cfg, f, indent=1)
    short = CLIPTextModel(CLIPTextConfig(**dict(OPEN_CLIP_CFG, num_hidden_layers=OPEN_CLIP_CFG["num_hidden_layers"] - 1)))
    missing, unexpected = short.load_state_dict(clip.state_dict(), strict=False)
    assert not missing, missing
    short = short.half().eval()
    short.save_pretrained(os.path.join(FOLDER, "text_encoder"), safe_serialization=True)
    return short.float()
FILE = os.path.join(FIX, "tiny-sd2-openclip.safetensors")


def open_clip_state(clip):
    """transformers CLIP → OpenCLIP names under cond_stage_model.model (q, k, v fused)."""
    sd = {k.removeprefix("text_model."): v for k, v in clip.state_dict().items()}
    p = "cond_stage_model.model."
    out = {
        p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["final_layer_norm.weight"],
        p + "ln_final.bias": sd["final_layer_norm.bias"],
        # Unused by SD 2's conditioning; present in real files.
        p + "text_projection": torch.eye(OPEN_CLIP_CFG["hidden_size"]),
    }
    for i in range(OPEN_CLIP_CFG["num_hidden_layers"]):
        a, b = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"attn.in_proj_{kind}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for mine, theirs in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                out[b + f"{theirs}.{kind}"] = sd[a + f"{mine}.{kind}"]
    return out


def penultimate(clip, ids):
    """FrozenOpenCLIPEmbedder(layer="penultimate"): the second-to-last layer's output, ln_final."""
    hidden = clip(ids, output_hidden_states=True).hidden_states[-2]
    inner = getattr(clip, "text_model", clip)
    return inner.final_layer_norm(hidden)


def main():
    ks, kext = kdiff.load()
    os.makedirs(OUT, exist_ok=True)
    clip = make_clip(OPEN_CLIP_CFG, 2024)
    sd1 = load_file(os.path.join(FIX, "tiny-sd1.safetensors"))
    state = {k: v for k, v in sd1.items() if not k.startswith("cond_stage_model.")}
    state.update(open_clip_state(clip))
    save_file({k: v.half().contiguous() for k, v in state.items()}, FILE)

    tok, _ = tokenizer()
    tok.pad_token = "!"
    ids = {t: tok([t], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for t in (PROMPT, NEGATIVE)}
    assert ids[PROMPT][0, -1].item() == 0, "pads with '!' (id 0)"
    with torch.no_grad():
        cond, uncond = penultimate(clip, ids[PROMPT]), penultimate(clip, ids[NEGATIVE])
        save_file({"ids": ids[PROMPT].to(torch.int64), "hidden": cond.contiguous()}, os.path.join(OUT, "text.safetensors"))
        unet, vae, _ = load_models()
        from diffusers import DDIMScheduler

        ac = DDIMScheduler(**SD1_SCHEDULER).alphas_cumprod.float()
        gen = torch.Generator("cpu").manual_seed(42)
        noise = torch.randn((1, 4, 8, 8), generator=gen)
        lat = k_sample(ks, kext, Model(unet, ac, uncond, cond, 7.5), "eps", "euler", "normal", STEPS, noise, gen)
        x = (vae.decode(lat / SCALE).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        Image.fromarray((x * 255).round().astype(np.uint8)).save(os.path.join(OUT, "euler.png"))
        short = write_folder(clip)
        v_cond, v_uncond = short(ids[PROMPT]).last_hidden_state, short(ids[NEGATIVE]).last_hidden_state
        assert torch.equal(v_cond, cond), "the cut encoder's last layer is the penultimate one"
        gen = torch.Generator("cpu").manual_seed(42)
        noise = torch.randn((1, 4, 8, 8), generator=gen)
        lat = k_sample(ks, kext, Model(unet, ac, v_uncond, v_cond, 7.5), "v", "euler", "normal", STEPS, noise, gen)
        x = (vae.decode(lat / SCALE).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        Image.fromarray((x * 255).round().astype(np.uint8)).save(os.path.join(OUT, "folder_v_euler.png"))
    case = {"name": "euler", "sampler": "euler", "schedule": "normal", "eta": 0.0, "seed": 42, "width": 64,
            "height": 64, "steps": STEPS, "cfg_scale": 7.5, "prompt": PROMPT, "negative_prompt": NEGATIVE,
            "file": "sd2/euler.png"}
    with open(os.path.join(REF, "sd2.json"), "w") as f:
        folder_case = dict(case, name="folder_v_euler", file="sd2/folder_v_euler.png", model="tiny-sd2-v")
        json.dump({"cases": [dict(case, model="tiny-sd2-openclip.safetensors"), folder_case],
                   "versions": versions()}, f, indent=1)
        f.write("\n")
    print("wrote", FILE, os.path.getsize(FILE), "bytes")


if __name__ == "__main__":
    main()
