"""A tiny random SDXL model — two text encoders (a CLIP ViT-L-like CLIPTextModel and an
OpenCLIP bigG-like CLIPTextModelWithProjection), a UNet with SDXL's block layout and "text_time"
added conditioning, a VAE with scaling factor 0.13025 — as a diffusers folder and as an SGM
single file, with references for every stage of StableDiffusionXLPipeline.

    /tmp/torchenv/bin/python tools/make_sdxl_fixtures.py      # ~10 s

Writes tests/fixtures/tiny-sdxl/ (f16), tests/fixtures/tiny-sdxl.safetensors (f16, SGM names),
tests/fixtures/reference/sdxl.safetensors, sdxl.json and sdxl/*.png. Deterministic (fixed seeds;
weights rounded so that f32, f16 and bf16 hold the same numbers, as make_fixtures.py does).
Conventions are recorded in sdxl.json and tools/README.md."""

import copy
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compvis_keys  # noqa: E402
from make_fixtures import (  # noqa: E402
    FIX, REF, assert_same, image_stats, round_params, save_json, save_st, tokenizer, versions)

FOLDER = os.path.join(FIX, "tiny-sdxl")
FILE = os.path.join(FIX, "tiny-sdxl.safetensors")
OUT = os.path.join(REF, "sdxl")

# SDXL base's scheduler_config.json (EulerDiscreteScheduler), verbatim.
SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)

# The token tables (49408 x hidden) dominate the size, so the widths are tiny. Different
# widths for the two encoders (and a projection width unlike the hidden one) make a swapped
# concatenation or an untransposed text_projection fail loudly.
TE1_CFG = dict(
    vocab_size=49408, hidden_size=4, intermediate_size=12, num_hidden_layers=3, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=4,
)
TE2_CFG = dict(
    TE1_CFG, hidden_size=8, intermediate_size=20, num_attention_heads=2, hidden_act="gelu", pad_token_id=1,
    projection_dim=6,
)
CONTEXT = TE1_CFG["hidden_size"] + TE2_CFG["hidden_size"]
TIME_DIM = 4  # addition_time_embed_dim (SDXL: 256)

UNET_CFG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(1, 2, 2),  # diffusers' name for the number of heads, as SDXL's [5, 10, 20]
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=CONTEXT,
    norm_num_groups=4,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=TIME_DIM * 6 + TE2_CFG["projection_dim"],
)

VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    sample_size=64,
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.13025,
    force_upcast=True,
)

# As make_fixtures.py: a random UNet's eps is too small to tell samplers apart; scale conv_out.
UNET_SCALES = {"conv_out.weight": 4.0, "conv_out.bias": 4.0}
SEEDS = {"te1": 11, "te2": 12, "unet": 13, "vae": 14}

PROMPTS = ["a tiny red fox in the snow", "A photo of an astronaut riding a horse, (masterpiece:1.2)!"]
NEGATIVE = "blurry"
STEPS = 8
CFG = 5.0
SIZE = 64
ADD_TIME_IDS = [SIZE, SIZE, 0, 0, SIZE, SIZE]  # original (h, w), crop (top, left), target (h, w)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."


def make_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(SEEDS["te1"])
    te1 = round_params(CLIPTextModel(CLIPTextConfig(**TE1_CFG)))
    torch.manual_seed(SEEDS["te2"])
    te2 = round_params(CLIPTextModelWithProjection(CLIPTextConfig(**TE2_CFG)))
    torch.manual_seed(SEEDS["unet"])
    unet = round_params(UNet2DConditionModel(**UNET_CFG), UNET_SCALES)
    torch.manual_seed(SEEDS["vae"])
    vae = round_params(AutoencoderKL(**VAE_CFG))
    return te1, te2, unet, vae


def tokenizers():
    tok, tok_dir = tokenizer()
    tok2 = copy.deepcopy(tok)
    tok2.pad_token = "!"  # SDXL's tokenizer_2 pads with "!" (id 0), tokenizer with <|endoftext|>
    return tok, tok2, tok_dir


def write_folder(te1, te2, unet, vae, tok_dir):
    import diffusers
    from diffusers import EulerDiscreteScheduler

    shutil.rmtree(FOLDER, ignore_errors=True)
    os.makedirs(FOLDER)
    save_json({
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }, os.path.join(FOLDER, "model_index.json"))
    # Written verbatim: SDXL base's file carries keys EulerDiscreteScheduler itself ignores.
    os.makedirs(os.path.join(FOLDER, "scheduler"))
    save_json(dict({"_class_name": "EulerDiscreteScheduler", "_diffusers_version": diffusers.__version__}, **SCHEDULER),
              os.path.join(FOLDER, "scheduler", "scheduler_config.json"))
    EulerDiscreteScheduler.from_pretrained(FOLDER, subfolder="scheduler")  # loads
    with open(os.path.join(tok_dir, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        os.makedirs(os.path.join(FOLDER, sub))
        save_json(dict(tok_cfg, pad_token=pad), os.path.join(FOLDER, sub, "tokenizer_config.json"))
    for sub, m in (("text_encoder", te1), ("text_encoder_2", te2), ("unet", unet), ("vae", vae)):
        copy.deepcopy(m).half().save_pretrained(os.path.join(FOLDER, sub), safe_serialization=True)


def check_folder(te1, te2, unet, vae):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pairs = ((te1, CLIPTextModel, "text_encoder"), (te2, CLIPTextModelWithProjection, "text_encoder_2"),
             (unet, UNet2DConditionModel, "unet"), (vae, AutoencoderKL, "vae"))
    for ref, cls, sub in pairs:
        got = cls.from_pretrained(os.path.join(FOLDER, sub))
        assert_same(ref.state_dict(), got.state_dict(), f"tiny-sdxl/{sub}")


def unet_to_sgm(sd):
    """diffusers UNet -> SGM names: the SD1 map plus SDXL's add embedding as `label_emb.0`."""
    add = {k: v for k, v in sd.items() if k.startswith("add_embedding.")}
    out = compvis_keys.unet_to_compvis({k: v for k, v in sd.items() if k not in add}, UNET_CFG["layers_per_block"])
    for k, v in add.items():
        out[k.replace("add_embedding.linear_1.", "label_emb.0.0.").replace("add_embedding.linear_2.", "label_emb.0.2.")] = v
    return out


def open_clip_state(te2):
    """CLIPTextModelWithProjection -> OpenCLIP names (q, k, v fused; text_projection [width, proj])."""
    sd = {k.removeprefix("text_model."): v for k, v in te2.state_dict().items()}
    out = {
        "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        "positional_embedding": sd["embeddings.position_embedding.weight"],
        "ln_final.weight": sd["final_layer_norm.weight"],
        "ln_final.bias": sd["final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
    }
    for i in range(TE2_CFG["num_hidden_layers"]):
        a, b = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[b + f"attn.in_proj_{kind}"] = torch.cat([sd[a + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for mine, theirs in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]:
                out[b + f"{theirs}.{kind}"] = sd[a + f"{mine}.{kind}"]
    return out


def sgm_state(te1, te2, unet, vae):
    out = {}
    for prefix, sd in ((UNET_PREFIX, unet_to_sgm(unet.state_dict())),
                       (VAE_PREFIX, compvis_keys.vae_to_compvis(vae.state_dict(), len(VAE_CFG["block_out_channels"]))),
                       (TE1_PREFIX, compvis_keys.clip_to_compvis(te1.state_dict())),
                       (TE2_PREFIX, open_clip_state(te2))):
        for k, v in sd.items():
            out[prefix + k] = v.half().contiguous()
    return out


def check_single_file(te1, te2, unet, vae, tok, tok2):
    """Converts back with diffusers' converters and its public loader: every tensor must match."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders import single_file_utils as sfu

    ckpt = load_file(FILE)
    assert_same(unet.state_dict(), sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), "single-file unet")
    assert_same(vae.state_dict(), sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), "single-file vae")
    te1_sd = compvis_keys.clip_to_compvis(te1.state_dict())
    assert_same(te1_sd, sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix=TE1_PREFIX), "single-file text_encoder")
    te2_sd = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
              for k, v in te2.state_dict().items()}
    assert_same(te2_sd, sfu.convert_open_clip_checkpoint(te2, ckpt, prefix=TE2_PREFIX), "single-file text_encoder_2")
    pipe = StableDiffusionXLPipeline.from_single_file(
        FILE, config=FOLDER, local_files_only=True, tokenizer=tok, tokenizer_2=tok2, torch_dtype=torch.float32)
    for name, ref in (("unet", unet), ("vae", vae), ("text_encoder", te1), ("text_encoder_2", te2)):
        assert_same(ref.state_dict(), getattr(pipe, name).state_dict(), f"from_single_file {name}")


def encode(te1, te2, tok, tok2, texts):
    """StableDiffusionXLPipeline.encode_prompt, step by step (clip_skip None)."""
    ids1 = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out1 = te1(ids1, output_hidden_states=True)
    out2 = te2(ids2, output_hidden_states=True)
    h1, h2 = out1.hidden_states[-2], out2.hidden_states[-2]  # no final_layer_norm
    return {"te1_input_ids": ids1.long(), "te2_input_ids": ids2.long(), "te1_penultimate": h1,
            "te2_penultimate": h2, "te2_text_embeds": out2.text_embeds, "prompt_embeds": torch.cat([h1, h2], -1)}


def module_references(te1, te2, unet, vae, tok, tok2):
    res = {}
    with torch.no_grad():
        res.update(encode(te1, te2, tok, tok2, PROMPTS))
        res["add_time_ids"] = torch.tensor([ADD_TIME_IDS], dtype=torch.float32)
        g = torch.Generator().manual_seed(300)
        sample = torch.randn((2, 4, 8, 8), generator=g)
        ehs = torch.randn((2, 77, CONTEXT), generator=g)
        text_embeds = torch.randn((2, TE2_CFG["projection_dim"]), generator=g)
        # The second row is not the default, so a swapped or misordered time id shows.
        time_ids = torch.tensor([ADD_TIME_IDS, [96, 128, 8, 16, 64, 80]], dtype=torch.float32)
        t = torch.tensor([999.0, 500.0])
        out = unet(sample, t, encoder_hidden_states=ehs,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        res.update({"unet_sample": sample, "unet_timesteps": t, "unet_encoder_hidden_states": ehs,
                    "unet_text_embeds": text_embeds, "unet_time_ids": time_ids, "unet_out": out})
        latent = torch.randn((1, 4, 8, 8), generator=g)
        res.update({"vae_latent": latent, "vae_decoded": vae.decode(latent).sample})
    return res


def check_against_pipeline(pipe, res):
    """The step-by-step references equal what the pipeline itself computes."""
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True,
                                                      negative_prompt=[NEGATIVE] * len(PROMPTS))
        neg = pipe.encode_prompt([""], do_classifier_free_guidance=True)
    assert torch.equal(pe, res["prompt_embeds"]) and torch.equal(pooled, res["te2_text_embeds"])
    # force_zeros_for_empty_prompt: no negative prompt -> zero embeddings and zero pooled
    assert not neg[1].any() and not neg[3].any()
    ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32,
                                 text_encoder_projection_dim=TE2_CFG["projection_dim"])
    assert torch.equal(ids, res["add_time_ids"])
    print("  ok encode_prompt and add_time_ids match the pipeline")


def txt2img(te1, te2, unet, vae, tok, tok2, res):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline

    cases, latents, first = [], {}, None
    for name, cls in (("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)):
        sched = cls.from_config(SCHEDULER)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=tok2, unet=unet, scheduler=sched,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        if first is None:
            check_against_pipeline(pipe, res)
        gen = torch.Generator("cpu").manual_seed(42)
        noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=gen)
        seen = {}

        def keep(_pipe, _i, _t, kw):
            seen["latents"] = kw["latents"].clone()
            return kw

        with torch.no_grad():
            img = pipe(PROMPTS[0], negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                       guidance_scale=CFG, generator=gen, latents=noise.clone(), output_type="np",
                       callback_on_step_end=keep).images[0]
        img = (img * 255).round().astype(np.uint8)
        Image.fromarray(img).save(os.path.join(OUT, f"{name}_seed42.png"))
        latents[f"final_latents_{name}"] = seen["latents"]
        cases.append({"name": name, "scheduler": cls.__name__, "file": f"sdxl/{name}_seed42.png",
                      "latent_key": f"final_latents_{name}", "seed": 42, "steps": STEPS, "cfg_scale": CFG,
                      "width": SIZE, "height": SIZE, "prompt": PROMPTS[0], "negative_prompt": NEGATIVE,
                      "init_noise_sigma": float(sched.init_noise_sigma), "timesteps": sched.timesteps.tolist(),
                      "sigmas": sched.sigmas.tolist() if hasattr(sched, "sigmas") else None,
                      "stats": image_stats(img)})
        if first is None:
            first = img.astype(np.float64)
        else:
            cases[-1]["mad_vs_euler"] = round(float(np.abs(img - first).mean()), 3)
        print(f"  {name}: {image_stats(img)}")
    return cases, latents


def main():
    os.makedirs(OUT, exist_ok=True)
    te1, te2, unet, vae = make_models()
    tok, tok2, tok_dir = tokenizers()
    print("writing model layouts")
    write_folder(te1, te2, unet, vae, tok_dir)
    check_folder(te1, te2, unet, vae)
    save_st(sgm_state(te1, te2, unet, vae), FILE)
    check_single_file(te1, te2, unet, vae, tok, tok2)

    print("writing references")
    res = module_references(te1, te2, unet, vae, tok, tok2)
    assert res["te2_input_ids"][0, -1].item() == 0 and res["te1_input_ids"][0, -1].item() == 49407
    cases, latents = txt2img(te1, te2, unet, vae, tok, tok2, res)
    res.update(latents)
    save_st(res, os.path.join(REF, "sdxl.safetensors"))
    save_json({
        "prompts": PROMPTS,
        "tokenizer": {"max_length": 77, "padding": "max_length", "truncation": True,
                      "pad_token": "<|endoftext|> (49407)", "pad_token_2": "! (0)"},
        "conditioning": "prompt_embeds = cat([te1 hidden_states[-2], te2 hidden_states[-2]], -1), no final_layer_norm; "
                        "pooled = te2 text_embeds = text_projection(final_layer_norm(last layer) at the first EOS)",
        "add_time_ids": ADD_TIME_IDS,
        "add_time_ids_order": "original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w)",
        "unet": "unet_out = unet(unet_sample, unet_timesteps, unet_encoder_hidden_states, "
                "added_cond_kwargs={text_embeds: unet_text_embeds, time_ids: unet_time_ids})",
        "vae": "vae_decoded = vae.decode(vae_latent).sample (raw, no scaling)",
        "vae_scaling_factor": VAE_CFG["scaling_factor"],
        "force_zeros_for_empty_prompt": True,
        "force_zeros_note": "with negative_prompt None (or empty and force_zeros true) the pipeline uses zero "
                            "negative prompt_embeds and zero negative pooled; the cases use the non-empty negative",
        "ddim_vs_euler_note": "with the same 'leading' timesteps DDIM (eta 0) and Euler are the same first-order "
                              "ODE step except the last (Euler to sigma 0, DDIM to alphas_cumprod[0]), so the "
                              "images differ by well under 1 level; the final latents show it",
        "noise": "gen = torch.Generator('cpu').manual_seed(seed); latents = torch.randn((1, 4, H/8, W/8), generator=gen); "
                 "the pipeline multiplies them by scheduler.init_noise_sigma",
        "image": "vae.decode(latent / 0.13025) (f32, force_upcast irrelevant), (x/2+0.5).clamp(0,1)*255, round",
        "scheduler_config": SCHEDULER,
        "cases": cases,
        "versions": versions(),
    }, os.path.join(REF, "sdxl.json"))
    shutil.rmtree(tok_dir, ignore_errors=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for p in (FOLDER, OUT) for d, _, fs in os.walk(p) for f in fs)
    total += os.path.getsize(FILE) + os.path.getsize(os.path.join(REF, "sdxl.safetensors"))
    print(f"wrote {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
