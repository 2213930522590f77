"""A kohya-format LoRA for the tiny SDXL (tests/fixtures/tiny-sdxl/) that changes layers of all
three networks, the merged weights it gives, and a k-diffusion Euler a image with it applied.

    /tmp/torchenv/bin/python tools/make_sdxl_lora_fixtures.py      # ~20 s; needs k-diffusion

Reads tests/fixtures/tiny-sdxl/ (written by make_sdxl_fixtures.py, not rewritten here) and writes
- tests/fixtures/lora-sdxl/sdxl_kohya.safetensors: rank 2, alpha 1 (scale 0.5), f16, kohya's
  SDXL names: `lora_te1_text_model_encoder_layers_{i}_{self_attn_{q,k,v,out}_proj,mlp_fc{1,2}}`
  (CLIP ViT-L-like text encoder), `lora_te2_...` (the OpenCLIP bigG-like one, transformers
  names as kohya writes them), `lora_unet_<SGM/CompVis module path with _>` for the UNet
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `..._in_layers_2`, `..._op`,
  `lora_unet_label_emb_0_0`); conv layers are LoCon (`lora_down` [r, in, kh, kw], `lora_up`
  [out, r, 1, 1]);
- tests/fixtures/reference/lora_sdxl_weights.safetensors: every changed layer's merged f32
  weight at multiplier 1.0, `te1/<name>.weight`, `te2/<name>.weight` (transformers names without
  `text_model.`) and `unet/<diffusers name>.weight` (convs [out, in, kh, kw]);
- tests/fixtures/reference/lora_sdxl/euler_a_seed42.png and lora_sdxl.json: make_sdxl_fixtures'
  "euler_a" case (the same code: txt2img_ref.k_sample through make_sdxl_fixtures.XlUnet) on the
  tiny SDXL with the LoRA merged at 0.8 into all three networks (W += 0.8 * alpha/rank * up@down,
  f32), and a cross-check with diffusers' own kohya loader (load_lora_weights, fuse_lora at 0.8)
  and its EulerAncestralDiscreteScheduler from the same noise.

Deterministic: fixed seeds, factors rounded to be exact in f32, f16 and bf16; reruns are
byte-identical."""

import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kdiff  # noqa: E402
import lora_formulas as lf  # noqa: E402
import make_sdxl_fixtures as xl  # noqa: E402
import txt2img_ref  # noqa: E402
from make_fixtures import FIX, REF, image_stats, save_json, versions  # noqa: E402
from make_lora_fixtures import lora_parts, scaled  # noqa: E402

LORA_DIR = os.path.join(FIX, "lora-sdxl")
LORA_NAME = "sdxl_kohya"
LORA_FILE = LORA_NAME + ".safetensors"
OUT = os.path.join(REF, "lora_sdxl")
WEIGHTS = os.path.join(REF, "lora_sdxl_weights.safetensors")
RANK, ALPHA = 2, 1.0
SEED = 2024  # the factors' generator
MULTIPLIER = 0.8
# std(ΔW · alpha/rank) ≈ ratio · std(W) per layer; large enough that one network left out moves
# the image by many levels (the json's if_wrong), small enough that it stays unsaturated.
RATIO = {"te1": 0.6, "te2": 0.6, "unet": 0.35}

# The base case in sdxl.json this one repeats with the LoRA; its image is checked first.
BASE_CASE = "euler_a"
SAMPLER, SCHEDULE, IMAGE_SEED = xl.K_CASES[BASE_CASE][:3]
PROMPT = xl.PROMPTS[0]
TAG = f"<lora:{LORA_NAME}:{MULTIPLIER:g}>"

TE_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_T = "transformer_blocks"
# diffusers module paths; every kind of layer kohya's SDXL LoRA/LoCon trains, at every level of
# the UNet, plus the add embedding (SDXL's label_emb) that full-network LyCORIS presets train.
UNET_LAYERS = (
    # one whole transformer block of the first attention level (input_blocks_4_1)
    *(f"down_blocks.1.attentions.0.{_T}.0.{x}" for x in (
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")),
    "down_blocks.1.attentions.0.proj_in",
    "down_blocks.1.attentions.0.proj_out",
    # the second transformer block of a 2-layer level (input_blocks_8_1_transformer_blocks_1)
    f"down_blocks.2.attentions.1.{_T}.1.attn1.to_q",
    f"down_blocks.2.attentions.1.{_T}.1.attn2.to_k",
    # middle block (middle_block_1)
    f"mid_block.attentions.0.{_T}.1.attn1.to_v",
    f"mid_block.attentions.0.{_T}.1.ff.net.2",
    "mid_block.attentions.0.proj_out",
    # output blocks (output_blocks_1_1, _2_1, _3_1, _5_1)
    f"up_blocks.0.attentions.1.{_T}.1.attn2.to_v",
    "up_blocks.0.attentions.2.proj_in",
    f"up_blocks.0.attentions.2.{_T}.0.attn2.to_out.0",
    "up_blocks.1.attentions.0.proj_out",
    f"up_blocks.1.attentions.2.{_T}.0.attn1.to_k",
    # resnets, down/upsamplers (LoCon): in_layers_2, out_layers_3, skip_connection, emb_layers_1
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.resnets.1.time_emb_proj",
    "mid_block.resnets.1.conv1",
    "up_blocks.0.resnets.0.conv_shortcut",
    "up_blocks.1.upsamplers.0.conv",
    "up_blocks.2.resnets.1.conv2",
    # SDXL's add embedding (label_emb_0_0)
    "add_embedding.linear_1",
)


# --- the model ---------------------------------------------------------------------------------

class Models:
    """The tiny SDXL's f32 networks, read from the diffusers folder (f16 values, exact in f32)."""

    def __init__(self):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        f = xl.FOLDER
        self.te1 = CLIPTextModel.from_pretrained(os.path.join(f, "text_encoder"), dtype=torch.float32).eval()
        self.te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(f, "text_encoder_2"),
                                                               dtype=torch.float32).eval()
        self.unet = UNet2DConditionModel.from_pretrained(os.path.join(f, "unet"), torch_dtype=torch.float32).eval()
        self.vae = AutoencoderKL.from_pretrained(os.path.join(f, "vae"), torch_dtype=torch.float32).eval()

    def module(self, net, path):
        """`path`: diffusers name (UNet) or transformers name without `text_model.` (TEs)."""
        if net == "unet":
            return self.unet.get_submodule(path)
        return self.text_model(net).get_submodule(path)

    def text_model(self, net):
        """transformers 5: CLIPTextModel is the text model itself, CLIPTextModelWithProjection
        holds it as `text_model` (the state dicts say `encoder...` and `text_model.encoder...`)."""
        m = getattr(self, net)
        return getattr(m, "text_model", m)


def te_layers(models, net):
    n = len(models.text_model(net).encoder.layers)
    return [f"encoder.layers.{i}.{x}" for i in range(n) for x in TE_LAYERS]


def kohya_names(models):
    """(net, path) -> kohya name. UNet names go through make_sdxl_fixtures.unet_to_sgm (the
    single file's own map) and must be modules of tiny-sdxl.safetensors."""
    sgm = xl.unet_to_sgm({k: k for k in models.unet.state_dict()})
    to_sgm = {d.removesuffix(".weight"): s.removesuffix(".weight") for s, d in sgm.items() if d.endswith(".weight")}
    single = {k.removeprefix(xl.UNET_PREFIX).removesuffix(".weight") for k in load_file(xl.FILE)
              if k.startswith(xl.UNET_PREFIX) and k.endswith(".weight")}
    names = {}
    for net in ("te1", "te2"):
        for path in te_layers(models, net):
            names[(net, path)] = f"lora_{net}_text_model_{path.replace('.', '_')}"
    for path in UNET_LAYERS:
        assert to_sgm[path] in single, f"{path} -> {to_sgm[path]}: not in {xl.FILE}"
        names[("unet", path)] = "lora_unet_" + to_sgm[path].replace(".", "_")
    return names


# --- the network -------------------------------------------------------------------------------

def make_net(models, names):
    gen = torch.Generator().manual_seed(SEED)
    net = {}
    for key in names:
        w = models.module(*key).weight.detach()
        net[key] = scaled(lora_parts(gen, w, rank=RANK, alpha=ALPHA), w, RATIO[key[0]])
    return net


def kohya_file(net, names):
    out = {}
    for key, parts in net.items():
        for k, v in parts.items():
            out[f"{names[key]}.{k}"] = v.to(torch.float16).contiguous()
            assert torch.equal(out[f"{names[key]}.{k}"].float(), v.float()), (key, k)  # exact in f16
    return out


def merge(models, net, m, nets=("te1", "te2", "unet")):
    """W += m · (alpha / rank) · up @ down (lora_formulas.updown: A1111's network_lora), f32."""
    with torch.no_grad():
        for key, parts in net.items():
            if key[0] in nets:
                mod = models.module(*key)
                mod.weight += m * lf.updown(parts, mod.weight)[0]
    return models


def weight_key(net, path):
    return f"{net}/{path}.weight"


# --- sampling ----------------------------------------------------------------------------------

def render(models, ks, kext, ac, tok, tok2):
    """make_sdxl_fixtures.k_txt2img's sample() for the base case: the same generator order, the
    same CFG model (XlUnet under txt2img_ref.CfgModel) and k-diffusion sampler."""
    sampler, schedule, seed, w, h, negative = xl.K_CASES[BASE_CASE]
    with torch.no_grad():
        cond = xl.embed(models.te1, models.te2, tok, tok2, PROMPT)
        uncond = xl.embed_negative(models.te1, models.te2, tok, tok2, negative)
        gen = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn((1, 4, h // 8, w // 8), generator=gen)
        with xl.sdxl_constants():
            lat = txt2img_ref.k_sample(ks, kext, xl.XlUnet(models.unet, uncond, cond, xl.xl_time_ids(w, h)), ac,
                                       uncond[0], cond[0], sampler, schedule, noise, gen)
    assert torch.isfinite(lat).all()
    return xl.decode(models.vae, lat)


def pipeline_models(models, tok, tok2):
    return models.te1, models.te2, models.unet, models.vae, tok, tok2


def diffusers_image(models, tok, tok2):
    """StableDiffusionXLPipeline with the diffusers scheduler make_sdxl_fixtures pairs with the
    case (EulerAncestralDiscreteScheduler, linspace), from the same noise and generator."""
    sampler, schedule, seed, w, h, negative = xl.K_CASES[BASE_CASE]
    sched, label = xl.diffusers_scheduler(sampler, schedule)
    img, _ = xl.run_pipeline(xl.xl_pipeline(pipeline_models(models, tok, tok2), sched), seed, w, h, negative,
                             xl.CFG, xl.STEPS)
    return img, label


def diffusers_fused(tok, tok2):
    """Fresh models with the file fused by diffusers' own kohya loader at MULTIPLIER. Returns
    the models and the file's keys diffusers reported it could not load (none expected)."""
    import logging

    from diffusers.utils import logging as dlog

    models = Models()
    pipe = xl.xl_pipeline(pipeline_models(models, tok, tok2), xl.diffusers_scheduler(SAMPLER, SCHEDULE)[0])
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    root = dlog.get_logger("diffusers")
    root.addHandler(handler)
    try:
        pipe.load_lora_weights(LORA_DIR, weight_name=LORA_FILE, adapter_name=LORA_NAME)
        pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=MULTIPLIER,
                       adapter_names=[LORA_NAME])
        pipe.unload_lora_weights()
    finally:
        root.removeHandler(handler)
    return models, [r for r in records if "lora" in r.lower() or "key" in r.lower()]


def compare_fused(got, want, base, net):
    """diffusers' fused weights against the script's merge: every touched layer, and no other
    parameter of any network moved."""
    per_net, not_loaded = {}, []
    for key in net:
        a, b, c = (m.module(*key).weight for m in (got, want, base))
        if torch.equal(a, c):
            not_loaded.append(key)
        d = (a - b).abs().max().item()
        per_net[key[0]] = max(per_net.get(key[0], 0.0), d)
    touched = {(n, p + ".weight") for n, p in net}
    for name in ("te1", "te2", "unet"):
        g, b = getattr(got, name).state_dict(), getattr(base, name).state_dict()
        assert g.keys() == b.keys(), name
        for k in g:
            path = k.removeprefix("text_model.")
            if (name, path) not in touched:
                assert torch.equal(g[k], b[k]), f"diffusers changed {name}/{k}, which the LoRA does not touch"
    return {k: float(f"{v:.3g}") for k, v in per_net.items()}, not_loaded


# --- main --------------------------------------------------------------------------------------

def main():
    from diffusers import DDIMScheduler

    shutil.rmtree(LORA_DIR, ignore_errors=True)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(LORA_DIR)
    os.makedirs(OUT)
    torch.manual_seed(0)
    tok, tok2, tok_dir = xl.tokenizers()
    ks, kext = kdiff.load()
    ac = DDIMScheduler.from_config(xl.SCHEDULER).alphas_cumprod.float()

    base_models = Models()
    names = kohya_names(base_models)
    net = make_net(base_models, names)
    save_file(kohya_file(net, names), os.path.join(LORA_DIR, LORA_FILE))

    # merged weights at multiplier 1
    ref = {}
    for key, parts in net.items():
        w = base_models.module(*key).weight.detach()
        ref[weight_key(*key)] = (w + lf.updown(parts, w)[0]).contiguous()
    save_file(ref, WEIGHTS)

    # the base image is sdxl.json's euler_a case
    base_img = render(base_models, ks, kext, ac, tok, tok2)
    base_file = f"sdxl/{BASE_CASE}_seed{IMAGE_SEED}.png"
    committed = np.array(Image.open(os.path.join(REF, base_file)).convert("RGB"))
    base_diff = xl.max_diff(base_img, committed)
    assert base_diff == 0, f"the unmerged model does not reproduce {base_file} ({base_diff} levels)"
    print(f"  ok no-LoRA render equals {base_file}")

    merged = merge(Models(), net, MULTIPLIER)
    img = render(merged, ks, kext, ac, tok, tok2)
    stats = image_stats(img)
    assert 0.0 < stats["clipped"] < 0.05 and stats["std"] > 20, stats
    file = f"lora_sdxl/{BASE_CASE}_seed{IMAGE_SEED}.png"
    Image.fromarray(img).save(os.path.join(REF, file))

    # how far the mistakes a test must catch move the image
    wrong = {}
    for label, m, nets in (("te1_not_merged", MULTIPLIER, ("te2", "unet")),
                           ("te2_not_merged", MULTIPLIER, ("te1", "unet")),
                           ("unet_not_merged", MULTIPLIER, ("te1", "te2")),
                           ("multiplier_1.0", 1.0, ("te1", "te2", "unet"))):
        other = render(merge(Models(), net, m, nets), ks, kext, ac, tok, tok2)
        wrong[label] = {"max_abs_diff": xl.max_diff(img, other), "mad": mad(img, other)}
    print(f"  {file}: {stats}, vs base mad {mad(img, base_img)} max {xl.max_diff(img, base_img)}; if wrong: {wrong}")

    # diffusers' own kohya loader + fuse, and its Euler a scheduler
    fused, warnings = diffusers_fused(tok, tok2)
    fused_diff, not_loaded = compare_fused(fused, merged, Models(), net)
    print(f"  diffusers fuse_lora vs script merge max |Δ| per network: {fused_diff}; not loaded: {not_loaded}")
    assert max(fused_diff.values()) < 1e-5, fused_diff
    d_img, d_label = diffusers_image(fused, tok, tok2)
    d_ours_img, _ = diffusers_image(merged, tok, tok2)
    d_base_img, _ = diffusers_image(Models(), tok, tok2)
    cross = {
        "diffusers_scheduler": d_label,
        "loader": f"pipe.load_lora_weights(lora-sdxl, weight_name='{LORA_FILE}'), fuse_lora(components=[unet, "
                  f"text_encoder, text_encoder_2], lora_scale={MULTIPLIER}), unload_lora_weights()",
        "keys_not_loaded": [names[k] for k in not_loaded],
        "loader_warnings": warnings,
        "fused_weights_max_abs_diff": fused_diff,
        "diffusers_max_abs_diff": xl.max_diff(img, d_img),
        "diffusers_mad": mad(img, d_img),
        "diffusers_on_script_merge_max_abs_diff": xl.max_diff(img, d_ours_img),
        "diffusers_without_lora_vs_base_max_abs_diff": xl.max_diff(base_img, d_base_img),
    }
    print(f"  diffusers image vs ours: max {cross['diffusers_max_abs_diff']} mad {cross['diffusers_mad']} "
          f"(no LoRA: {cross['diffusers_without_lora_vs_base_max_abs_diff']})")

    counts = {n: sum(1 for k in net if k[0] == n) for n in ("te1", "te2", "unet")}
    layers = {n: [{"kohya": names[k], "weight": weight_key(*k), "shape": list(models_shape(base_models, k)),
                   "kind": layer_kind(base_models, k)} for k in net if k[0] == n] for n in counts}
    sampler, schedule, seed, w, h, negative = xl.K_CASES[BASE_CASE]
    case = {
        "name": f"{BASE_CASE}_{LORA_NAME}", "lora": f"lora-sdxl/{LORA_FILE}", "lora_name": LORA_NAME,
        "format": "kohya LoRA/LoCon, SDXL names (lora_te1_, lora_te2_, lora_unet_ + SGM module path)",
        "model": "tiny-sdxl", "multiplier": MULTIPLIER, "te_multiplier": MULTIPLIER, "unet_multiplier": MULTIPLIER,
        "tag": TAG, "prompt": f"{PROMPT} {TAG}", "base_prompt": PROMPT, "negative_prompt": negative,
        "sampler": sampler, "schedule": schedule, "eta": 1.0, "seed": seed, "steps": xl.STEPS, "cfg_scale": xl.CFG,
        "width": w, "height": h, "add_time_ids": xl.xl_time_ids(w, h)[0].int().tolist(), "file": file,
        "base_file": base_file, "stats": stats, "mad_vs_base": mad(img, base_img),
        "max_abs_diff_vs_base": xl.max_diff(img, base_img), "if_wrong": wrong,
        "made_by": "script merge (A1111's formula, f32) + k-diffusion (txt2img_ref.k_sample), as sdxl.json's "
                   f"{BASE_CASE}", "diffusers_cross_check": cross,
    }
    save_json({
        "cases": [case],
        "rank": RANK, "alpha": ALPHA, "scale": ALPHA / RANK, "factor_seed": SEED,
        "std_ratio": RATIO,
        "std_ratio_note": "each module's factors are scaled so that std(ΔW·scale) ≈ std_ratio · std(W), then "
                          "rounded to values exact in f32, f16 and bf16 (the file is f16)",
        "layer_counts": counts,
        "layers": layers,
        "names": "te1: lora_te1_text_model_<transformers path with _>, te2: lora_te2_text_model_<same> (kohya writes "
                 "the transformers names for both; the SGM single file holds te2 as OpenCLIP, whose fused "
                 "in_proj takes the q, k, v updates in its row blocks), unet: lora_unet_<SGM path with _> "
                 "(make_sdxl_fixtures.unet_to_sgm: add_embedding.linear_1 -> label_emb.0.0, upsamplers of "
                 "levels with attention at slot 2)",
        "merge": "W' = W + m · (alpha / rank) · ΔW, ΔW = up.reshape(out, r) @ down.reshape(r, -1) reshaped to W "
                 "(LoCon convs: lora_down [r, in, kh, kw], lora_up [out, r, 1, 1]); m = multiplier for all three "
                 "networks; merged in f32 into tiny-sdxl/'s weights",
        "weights": {"file": "lora_sdxl_weights.safetensors", "multiplier": 1.0,
                    "keys": "te1/<transformers name without text_model.>.weight, te2/<same>, unet/<diffusers "
                            "name>.weight; f32, convs [out, in, kh, kw]"},
        "unused_note": "te1's last layer (encoder.layers.2) does not reach the image: SDXL conditions on te1's "
                       "penultimate hidden states and uses te2's pooled output only; its merged weights are "
                       "still in lora_sdxl_weights.safetensors",
        "prompt_note": "prompt is the text with A1111's tag; the text encoders see base_prompt (the tag removed)",
        "if_wrong": "max_abs_diff / mad (0..255 levels) between the committed image and the same run with one "
                    "network left unmerged, or at multiplier 1.0: a test must compare more tightly than that",
        "diffusers_cross_check": "diffusers_max_abs_diff: the committed image against StableDiffusionXLPipeline "
                                 "with diffusers' fused LoRA and its Euler a scheduler from the same noise and "
                                 "generator (the sampler conventions differ slightly, as sdxl.json's euler_a case); "
                                 "diffusers_on_script_merge_max_abs_diff: the same pipeline on the script's merged "
                                 "weights; fused_weights_max_abs_diff: diffusers' fused weights against the script's",
        "versions": versions(),
    }, os.path.join(REF, "lora_sdxl.json"))
    shutil.rmtree(tok_dir, ignore_errors=True)
    sizes = {os.path.relpath(p, FIX): os.path.getsize(p)
             for p in (os.path.join(LORA_DIR, LORA_FILE), WEIGHTS, os.path.join(REF, file))}
    print(f"  layers {counts}; sizes {sizes}")


def models_shape(models, key):
    return tuple(models.module(*key).weight.shape)


def layer_kind(models, key):
    w = models.module(*key).weight
    return f"conv{w.shape[2]}x{w.shape[3]}" if w.dim() == 4 else "linear"


def mad(a, b):
    return round(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()), 3)


if __name__ == "__main__":
    main()
