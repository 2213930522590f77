"""A tiny random SDXL model — two text encoders (a CLIP ViT-L-like CLIPTextModel and an
OpenCLIP bigG-like CLIPTextModelWithProjection), a UNet with SDXL's block layout and "text_time"
added conditioning, a VAE with scaling factor 0.13025 — as a diffusers folder and as an SGM
single file, with references for every stage of StableDiffusionXLPipeline and whole images.

    /tmp/torchenv/bin/python tools/make_sdxl_fixtures.py      # ~25 s on 2 cores; needs k-diffusion (tools/README.md)

Writes tests/fixtures/tiny-sdxl/ (f16), tests/fixtures/tiny-sdxl.safetensors (f16, SGM names),
tests/fixtures/reference/sdxl.safetensors, sdxl.json and sdxl/*.png. Deterministic (fixed seeds;
weights rounded so that f32, f16 and bf16 hold the same numbers, as make_fixtures.py does).
Conventions are recorded in sdxl.json and tools/README.md.

Images (each case in sdxl.json names its sampler, schedule, seed, size and final latent key):
- "euler", "ddim": diffusers' StableDiffusionXLPipeline with SDXL base's scheduler config
  ("leading" timesteps, offset 1) — for Euler that is no k-diffusion schedule;
- every other txt2img case: the SD 1 references' k-diffusion code itself (txt2img_ref.k_sample,
  and make_vpred_fixtures.k_sample for the uncond-free SGM Uniform turbo case) with A1111's
  noise conventions: one CPU generator per image seeded with the seed, the initial noise
  `randn((1, 4, H/8, W/8))` drawn first, sampler noise after it; the UNet is called with the
  context [uncond, cond] (cond alone at a cfg scale <= 1) and
  added_cond_kwargs = {text_embeds: the matching pooled, time_ids: (H, W, 0, 0, H, W)};
  an empty negative prompt is A1111's zeros (context and pooled), see "force_zeros_note";
- img2img: make_img2img_fixtures.py's code and conventions (generator order: VAE posterior
  sample, initial noise, sampler noise; A1111's sample_img2img start for k-samplers, diffusers'
  img2img — here StableDiffusionXLImg2ImgPipeline — for DDIM) with init latent
  0.13025 * sampled latent;
- where a diffusers scheduler walks the same sigmas, the case also records
  "diffusers_max_abs_diff", its image's largest difference from the committed one in 0..255 levels."""

import contextlib
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
import kdiff  # noqa: E402
import make_img2img_fixtures as i2i  # noqa: E402
import make_vpred_fixtures as vpred  # noqa: E402
import txt2img_ref  # noqa: E402
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
#
# Head counts (here and in UNET_CFG) follow the rule real models are built by and sdrs relies
# on: a single file cannot express how many attention heads a network has, so sdrs infers
# heads = max(1, width // 64) (head width 64) for both text encoders and every UNet level.
# All widths here are under 64, so every attention has exactly one head; any other count would
# make the folder describe a different model than the one sdrs builds from the single file.
TE1_CFG = dict(
    vocab_size=49408, hidden_size=4, intermediate_size=12, num_hidden_layers=3, num_attention_heads=1,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=4,
)
TE2_CFG = dict(
    TE1_CFG, hidden_size=8, intermediate_size=20, num_attention_heads=1, hidden_act="gelu", pad_token_id=1,
    projection_dim=6,
)
CONTEXT = TE1_CFG["hidden_size"] + TE2_CFG["hidden_size"]
TIME_DIM = 4  # addition_time_embed_dim (SDXL: 256)

UNET_CFG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    # GroupNorm's 32 groups are another thing a single file cannot say (sdrs assumes SD's 32),
    # so the channels are multiples of 32, as in the tiny SD 1 and SD 2 models.
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    # diffusers' name for the number of heads, as SDXL's [5, 10, 20] (= 320/64, 640/64, 1280/64);
    # one per level by the width-64 rule above (max(1, 32 // 64), 64 // 64, 64 // 64).
    attention_head_dim=(1, 1, 1),
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=CONTEXT,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=TIME_DIM * 6 + TE2_CFG["projection_dim"],
)

VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    sample_size=64,
    block_out_channels=(32, 32, 32, 32),  # 32 groups need multiples of 32 (see UNET_CFG)
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
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

SCALE = VAE_CFG["scaling_factor"]
# k-diffusion-convention images: name -> (sampler, schedule, seed, width, height, negative prompt).
# Euler at 64x32 checks the time ids' (h, w) order; "" is A1111's zero uncond (force_zeros_note).
K_CASES = {
    "euler_a": ("euler_a", "normal", 42, SIZE, SIZE, NEGATIVE),
    "dpmpp_2m_karras": ("dpmpp_2m", "karras", 42, SIZE, SIZE, NEGATIVE),
    "euler_64x32": ("euler", "normal", 7, 64, 32, NEGATIVE),
    "euler_empty_negative": ("euler", "normal", 42, SIZE, SIZE, ""),
}
# The diffusers scheduler that walks the same sigmas as each k-diffusion (sampler, schedule):
# "linspace" spacing puts the timesteps at linspace(999, 0, S) like k-diffusion's get_sigmas
# (diffusers interpolates sigma linearly between training timesteps, k-diffusion log-sigma);
# DPMSolverMultistep rounds the Karras timesteps it feeds the UNet and starts from the unit
# noise where k-diffusion starts from noise * sigma_max (both differences are small).
DIFFUSERS_SCHEDULERS = {
    ("euler", "normal"): ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("euler_a", "normal"): ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("dpmpp_2m", "karras"): ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("euler_a", "sgm_uniform"): ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
}
IMG2IMG_SEED = 42
IMG2IMG_STRENGTH = 0.75
IMG2IMG_INIT = "img2img/init.png"  # make_img2img_fixtures.init_image(), written by that script
TURBO_STEPS = 1


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
        empty = pipe.encode_prompt([""], do_classifier_free_guidance=True, negative_prompt=[""])
        enc = encode(pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, [""])
    assert torch.equal(pe, res["prompt_embeds"]) and torch.equal(pooled, res["te2_text_embeds"])
    # force_zeros_for_empty_prompt: no negative prompt (None) -> zero embeddings and zero pooled;
    # negative_prompt="" is encoded like any prompt (force_zeros_note)
    assert not neg[1].any() and not neg[3].any()
    assert torch.equal(empty[1], enc["prompt_embeds"]) and torch.equal(empty[3], enc["te2_text_embeds"])
    assert empty[1].any() and empty[3].any()
    ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), dtype=torch.float32,
                                 text_encoder_projection_dim=TE2_CFG["projection_dim"])
    assert torch.equal(ids, res["add_time_ids"])
    print("  ok encode_prompt (None negative zeroed, '' encoded) and add_time_ids match the pipeline")


def xl_pipeline(models, sched, cls=None):
    """StableDiffusionXLPipeline (or `cls`, e.g. the img2img one) over the tiny models, f32."""
    from diffusers import StableDiffusionXLPipeline

    te1, te2, unet, vae, tok, tok2 = models
    pipe = (cls or StableDiffusionXLPipeline)(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                              tokenizer_2=tok2, unet=unet, scheduler=sched,
                                              force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, seed, width, height, negative, cfg, steps, **kw):
    """One image with the pipeline, starting from the k-diffusion-convention noise (drawn first
    from the image's generator, which the scheduler then draws its noise from). Returns the
    uint8 image and the final latents."""
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 4, height // 8, width // 8), generator=gen)
    seen = {}

    def keep(_pipe, _i, _t, kw):
        seen["latents"] = kw["latents"].clone()
        return kw

    with torch.no_grad():
        img = pipe(PROMPTS[0], negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
                   guidance_scale=cfg, generator=gen, latents=noise.clone(), output_type="np",
                   callback_on_step_end=keep, **kw).images[0]
    return (img * 255).round().astype(np.uint8), seen["latents"]


def txt2img(te1, te2, unet, vae, tok, tok2, res):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cases, latents, first = [], {}, None
    for name, cls in (("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)):
        sched = cls.from_config(SCHEDULER)
        pipe = xl_pipeline((te1, te2, unet, vae, tok, tok2), sched)
        if first is None:
            check_against_pipeline(pipe, res)
        img, lat = run_pipeline(pipe, 42, SIZE, SIZE, NEGATIVE, CFG, STEPS)
        Image.fromarray(img).save(os.path.join(OUT, f"{name}_seed42.png"))
        latents[f"final_latents_{name}"] = lat
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
    # What the later cases' fields mean for these two: diffusers' "leading" timesteps (offset 1).
    # For DDIM that is what the SD 1 references call schedule "normal"; for Euler it is no
    # k-diffusion schedule (those start at sigma_max, this at the sigma of timestep 876).
    cases[0].update(sampler="euler", schedule="leading", eta=0.0, made_by="diffusers StableDiffusionXLPipeline")
    cases[1].update(sampler="ddim", schedule="normal", eta=0.0, made_by="diffusers StableDiffusionXLPipeline")
    return cases, latents


@contextlib.contextmanager
def sdxl_constants():
    """The SD 1 sampler code reads two module constants at call time: txt2img_ref.CfgModel
    its CFG (7.5) and make_img2img_fixtures.k_img2img its SCALE (0.18215); SDXL runs them at
    cfg 5 and 0.13025. Everything else (STEPS 8, the samplers, the generator order) is shared."""
    assert txt2img_ref.STEPS == i2i.STEPS == STEPS
    saved = txt2img_ref.CFG, i2i.SCALE
    txt2img_ref.CFG, i2i.SCALE = CFG, SCALE
    try:
        yield
    finally:
        txt2img_ref.CFG, i2i.SCALE = saved


class XlUnet:
    """The SDXL UNet behind the SD 1 samplers' `unet(x, t, encoder_hidden_states=ctx).sample`:
    txt2img_ref.CfgModel calls it on the batch [uncond, cond], make_vpred_fixtures.Model at a
    cfg scale <= 1 on cond alone; the pooled text embeds of the same rows and the time ids
    (H, W, 0, 0, H, W) go in added_cond_kwargs."""

    def __init__(self, unet, uncond, cond, time_ids):
        self.unet, self.uncond, self.cond, self.time_ids = unet, uncond, cond, time_ids

    def __call__(self, x, t, encoder_hidden_states):
        if x.shape[0] == 2:
            assert torch.equal(encoder_hidden_states, torch.cat([self.uncond[0], self.cond[0]]))
            pooled = torch.cat([self.uncond[1], self.cond[1]])
        else:
            assert torch.equal(encoder_hidden_states, self.cond[0])
            pooled = self.cond[1]
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": self.time_ids.repeat(x.shape[0], 1)})


class KeepLatent:
    """k-diffusion's sampling module, keeping what its samplers return (k_img2img returns only
    the decoded image)."""

    def __init__(self, ks):
        self.ks, self.latent = ks, None

    def __getattr__(self, name):
        f = getattr(self.ks, name)
        if not name.startswith("sample_"):
            return f

        def run(*args, **kw):
            self.latent = f(*args, **kw)
            return self.latent

        return run


def embed(te1, te2, tok, tok2, text):
    """(context, pooled) of one prompt, as encode_prompt computes them."""
    enc = encode(te1, te2, tok, tok2, [text])
    return enc["prompt_embeds"], enc["te2_text_embeds"]


def embed_negative(te1, te2, tok, tok2, text):
    """A negative prompt's (context, pooled); "" is A1111's SDXL zeros (sd_models_xl's
    get_learned_conditioning: force_zero_embeddings=['txt'] zeroes both text embedders'
    outputs, the cross-attention context and the pooled), diffusers' negative_prompt=None."""
    ctx, pooled = embed(te1, te2, tok, tok2, text)
    if text == "":
        return torch.zeros_like(ctx), torch.zeros_like(pooled)
    return ctx, pooled


def xl_time_ids(width, height):
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def diffusers_scheduler(sampler, schedule):
    import diffusers

    name, extra = DIFFUSERS_SCHEDULERS[(sampler, schedule)]
    sched = getattr(diffusers, name).from_config(SCHEDULER, **extra)
    label = f"{name}.from_config(SCHEDULER, " + ", ".join(f"{k}={v!r}" for k, v in extra.items()) + ")"
    return sched, label


def decode(vae, lat):
    with torch.no_grad():
        return i2i.to_uint8(vae.decode(lat / SCALE).sample)


def max_diff(a, b):
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def case_entry(name, sampler, schedule, seed, width, height, steps, cfg, negative, file, img, **extra):
    return dict({"name": name, "sampler": sampler, "schedule": schedule, "eta": 1.0 if sampler == "euler_a" else 0.0,
                 "seed": seed, "width": width, "height": height, "steps": steps, "cfg_scale": cfg,
                 "prompt": PROMPTS[0], "negative_prompt": negative, "file": file, "latent_key": f"final_latents_{name}",
                 "add_time_ids": xl_time_ids(width, height)[0].int().tolist(), "stats": image_stats(img)}, **extra)


def k_txt2img(models, ks, kext, ac):
    """The k-diffusion-convention txt2img cases (txt2img_ref.k_sample), each also run through
    StableDiffusionXLPipeline with the matching diffusers scheduler."""
    te1, te2, unet, vae, tok, tok2 = models
    cases, latents = [], {}
    with torch.no_grad():
        cond = embed(te1, te2, tok, tok2, PROMPTS[0])

    def sample(sampler, schedule, seed, w, h, uncond, ids):
        with torch.no_grad():
            gen = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn((1, 4, h // 8, w // 8), generator=gen)
            with sdxl_constants():
                return txt2img_ref.k_sample(ks, kext, XlUnet(unet, uncond, cond, ids), ac, uncond[0], cond[0],
                                            sampler, schedule, noise, gen)

    for name, (sampler, schedule, seed, w, h, negative) in K_CASES.items():
        with torch.no_grad():
            uncond = embed_negative(te1, te2, tok, tok2, negative)
        lat = sample(sampler, schedule, seed, w, h, uncond, xl_time_ids(w, h))
        img = decode(vae, lat)
        # How far the mistakes these cases exist to catch move the image (a test's tolerance must
        # stay below): time ids as (w, h), or "" encoded as diffusers does for negative_prompt="".
        wrong = {}
        if w != h:
            wrong["time_ids_swapped"] = sample(sampler, schedule, seed, w, h, uncond, xl_time_ids(h, w))
        if negative == "":
            with torch.no_grad():
                encoded = embed(te1, te2, tok, tok2, "")
            wrong["empty_negative_encoded"] = sample(sampler, schedule, seed, w, h, encoded, xl_time_ids(w, h))
        mistakes = {k: {"max_abs_diff": max_diff(img, decode(vae, v)),
                        "latent_max_abs_diff": round(float((v - lat).abs().max()), 4)} for k, v in wrong.items()}
        sched, label = diffusers_scheduler(sampler, schedule)
        # diffusers zeroes the negative for None, not for "" (force_zeros_note)
        ref, _ = run_pipeline(xl_pipeline(models, sched), seed, w, h, negative or None, CFG, STEPS)
        file = f"sdxl/{name}_seed{seed}.png"
        Image.fromarray(img).save(os.path.join(REF, file))
        latents[f"final_latents_{name}"] = lat
        cases.append(case_entry(name, sampler, schedule, seed, w, h, STEPS, CFG, negative, file, img,
                                made_by="k-diffusion (txt2img_ref.k_sample)", diffusers_scheduler=label,
                                diffusers_max_abs_diff=max_diff(img, ref),
                                **({"if_wrong": mistakes} if mistakes else {})))
        print(f"  {name}: {image_stats(img)}, diffusers max |diff| {cases[-1]['diffusers_max_abs_diff']}"
              + "".join(f", {k}: {v}" for k, v in mistakes.items()))
    return cases, latents


def turbo(models, ks, kext, ac):
    """SDXL-Turbo style: Euler a over A1111's SGM Uniform sigmas in one step, no guidance (the
    unconditional pass skipped), with make_vpred_fixtures' sampler; diffusers' Euler a with
    "trailing" spacing must give the same image within one level."""
    te1, te2, unet, vae, tok, tok2 = models
    name, sampler, schedule, seed, negative = "turbo_1step", "euler_a", "sgm_uniform", 42, ""
    with torch.no_grad():
        cond, uncond = embed(te1, te2, tok, tok2, PROMPTS[0]), embed_negative(te1, te2, tok, tok2, negative)
        gen = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=gen)
        model = vpred.Model(XlUnet(unet, uncond, cond, xl_time_ids(SIZE, SIZE)), ac, uncond[0], cond[0], 0.0)
        lat = vpred.k_sample(ks, kext, model, "eps", sampler, schedule, TURBO_STEPS, noise, gen)
    img = decode(vae, lat)
    sched, label = diffusers_scheduler(sampler, schedule)
    ref, _ = run_pipeline(xl_pipeline(models, sched), seed, SIZE, SIZE, None, 0.0, TURBO_STEPS)
    diff = max_diff(img, ref)
    assert diff <= 1, f"turbo: k-diffusion and diffusers differ by {diff} levels"
    print(f"  ok {name} matches diffusers' {label} within {diff} level(s)")
    file = f"sdxl/{name}_seed{seed}.png"
    Image.fromarray(img).save(os.path.join(REF, file))
    return case_entry(name, sampler, schedule, seed, SIZE, SIZE, TURBO_STEPS, 0.0, negative, file, img,
                      made_by="k-diffusion (make_vpred_fixtures.k_sample, cond only)", diffusers_scheduler=label,
                      diffusers_max_abs_diff=diff), {f"final_latents_{name}": lat}


def img2img(models, ks, kext, ac):
    """make_img2img_fixtures' Euler (k_img2img, A1111's sample_img2img start) and DDIM (diffusers'
    img2img, here StableDiffusionXLImg2ImgPipeline) at strength 0.75 from its init image."""
    from diffusers import DDIMScheduler, StableDiffusionXLImg2ImgPipeline

    te1, te2, unet, vae, tok, tok2 = models
    init = i2i.init_image()
    on_disk = np.array(Image.open(os.path.join(REF, IMG2IMG_INIT)).convert("RGB"))
    assert np.array_equal(np.array(init), on_disk), f"{IMG2IMG_INIT} is not make_img2img_fixtures.init_image()"
    seed, strength, cases, latents = IMG2IMG_SEED, IMG2IMG_STRENGTH, [], {}
    with torch.no_grad():
        cond, uncond = embed(te1, te2, tok, tok2, PROMPTS[0]), embed_negative(te1, te2, tok, tok2, NEGATIVE)
        rec = KeepLatent(ks)
        with sdxl_constants():
            img = i2i.k_img2img(rec, kext, XlUnet(unet, uncond, cond, xl_time_ids(SIZE, SIZE)), vae, ac, uncond[0],
                                cond[0], init, "euler", "normal", seed, strength)
    runs = [("img2img_euler", "euler", img, rec.latent, "k-diffusion (make_img2img_fixtures.k_img2img)")]
    pipe = xl_pipeline(models, DDIMScheduler.from_config(SCHEDULER), StableDiffusionXLImg2ImgPipeline)
    seen = {}

    def keep(_pipe, _i, _t, kw):
        seen["latents"] = kw["latents"].clone()
        return kw

    with torch.no_grad():
        out = pipe(PROMPTS[0], image=init, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                   guidance_scale=CFG, eta=0.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                   callback_on_step_end=keep).images[0]
    runs.append(("img2img_ddim", "ddim", (out * 255).round().astype(np.uint8), seen["latents"],
                 "diffusers StableDiffusionXLImg2ImgPipeline (DDIMScheduler.from_config(SCHEDULER))"))
    for name, sampler, img, lat, made_by in runs:
        file = f"sdxl/{name}_s{strength}_seed{seed}.png"
        Image.fromarray(img).save(os.path.join(REF, file))
        latents[f"final_latents_{name}"] = lat
        cases.append(case_entry(name, sampler, "normal", seed, SIZE, SIZE, STEPS, CFG, NEGATIVE, file, img,
                                strength=strength, init=IMG2IMG_INIT, made_by=made_by))
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
    from diffusers import DDIMScheduler

    ks, kext = kdiff.load()
    ac = DDIMScheduler.from_config(SCHEDULER).alphas_cumprod.float()
    models = (te1, te2, unet, vae, tok, tok2)
    for run in (k_txt2img, img2img):
        more, latents = run(models, ks, kext, ac)
        cases += more
        res.update(latents)
    more, latents = turbo(models, ks, kext, ac)
    cases.append(more)
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
        "force_zeros_note": "diffusers 0.42.1 StableDiffusionXLPipeline.encode_prompt: zero_out_negative_prompt = "
                            "negative_prompt is None and config.force_zeros_for_empty_prompt; then (with cfg on and no "
                            "negative_prompt_embeds given) the negative prompt_embeds and negative pooled are "
                            "zeros_like. negative_prompt='' is NOT zeroed: it goes through `negative_prompt or ''` and "
                            "is tokenized and encoded by both encoders like any prompt (checked here). A1111 zeroes an "
                            "all-empty negative (sd_models_xl.get_learned_conditioning, force_zero_embeddings=['txt']: "
                            "context and pooled; the size embeddings stay), so the cases with negative_prompt '' "
                            "(euler_empty_negative; turbo_1step, whose cfg 0 skips the uncond pass) use zeros, "
                            "which diffusers gives for negative_prompt=None; the other cases encode 'blurry'",
        "ddim_vs_euler_note": "with the same 'leading' timesteps DDIM (eta 0) and Euler are the same first-order "
                              "ODE step except the last (Euler to sigma 0, DDIM to alphas_cumprod[0]), so the "
                              "images differ by well under 1 level; the final latents show it",
        "noise": "gen = torch.Generator('cpu').manual_seed(seed); latents = torch.randn((1, 4, H/8, W/8), generator=gen); "
                 "the pipeline multiplies them by scheduler.init_noise_sigma, k-diffusion by sigmas[0]; sampler noise "
                 "(Euler a) is drawn from the same generator after it",
        "k_diffusion_cases": "made_by k-diffusion: txt2img_ref.k_sample (CompVisDenoiser(quantize=False) over "
                             "alphas_cumprod of scheduler_config; normal = get_sigmas(S), karras = "
                             "get_sigmas_karras(S, sigma_min, sigma_max, rho=7)), make_vpred_fixtures.k_sample "
                             "(sgm_uniform = A1111's sgm_uniform; cfg <= 1 runs cond alone), "
                             "make_img2img_fixtures.k_img2img; eps = u + cfg_scale * (c - u) from one UNet call on "
                             "[uncond, cond] with added_cond_kwargs text_embeds = [pooled_uncond, pooled_cond], "
                             "time_ids = add_time_ids of the case, (H, W, 0, 0, H, W), for both rows",
        "img2img": "generator order: VAE posterior sample (mean + std * randn), initial noise, sampler noise; init "
                   "latent = 0.13025 * sampled latent; euler: A1111's sample_img2img: t_enc = int(min(strength, "
                   "0.999) * S), sigmas of the full S-step schedule, sigma_sched = sigmas[S - t_enc - 1:], x = init + "
                   "noise * sigma_sched[0]; ddim: StableDiffusionXLImg2ImgPipeline (t_enc = min(int(strength * S), S) "
                   "last DDIM timesteps, add_noise); the init image is make_img2img_fixtures.init_image()",
        "if_wrong": "for euler_64x32 and euler_empty_negative: how far the image (max_abs_diff, 0..255 levels) and "
                    "the final latent (latent_max_abs_diff) move with time ids (W, H, 0, 0, W, H) instead of (H, W, ...) "
                    "or with '' encoded instead of zeroed: a test must compare more tightly than that",
        "diffusers_max_abs_diff": "largest |difference| in 0..255 levels between the committed k-diffusion image and "
                                  "StableDiffusionXLPipeline's with diffusers_scheduler, from the same noise and "
                                  "generator (sigma interpolation, DPM++'s rounded timesteps and unit start differ "
                                  "slightly); img2img has none (diffusers' img2img start differs from A1111's)",
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
