"""LoRA / LyCORIS fixtures for the tiny models and DDIM txt2img references with them applied.

    /tmp/torchenv/bin/python tools/make_lora_fixtures.py      # ~25 s

Writes tests/fixtures/lora/*.{safetensors,pt,bin} (random low-rank networks in the formats
below), reference/lora.json, reference/lora/*.png and reference/lora_weights.safetensors.

Every case is the txt2img DDIM reference of tools/txt2img_ref.py (64×64, 8 steps, seed 42,
CFG 7.5, the same prompt and negative) on the model with the network merged into its f32
weights: W += m · ΔW · scale, m the text-encoder multiplier for text-encoder layers and the
UNet multiplier for UNet layers (A1111's `<lora:name:te:unet>`). kohya_locon and peft are
merged by diffusers itself (load_lora_weights, fuse_lora per component, unload_lora_weights);
the script's own merge (tools/lora_formulas.py, A1111's formulas) must give the same weights.
The other formats diffusers does not read are merged by the script. See tools/README.md."""

import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lora_formulas as lf  # noqa: E402
from make_fixtures import FIX, REF, tokenizer, versions  # noqa: E402
from make_img2img_fixtures import load_models  # noqa: E402
from txt2img_ref import CFG, NEGATIVE, PROMPT, STEPS, pipe_sample  # noqa: E402

LORA_DIR = os.path.join(FIX, "lora")
OUT = os.path.join(REF, "lora")
RANK, ALPHA = 4, 2.0
SEED = 42
SD1, SD2 = "tiny-sd1.safetensors", "tiny-sd2-openclip.safetensors"
DIFFUSERS_REF = "diffusers load_lora_weights+fuse_lora"
SCRIPT_REF = "script merge (A1111 formulas)"

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
UNET_CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
TE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def exact(t):
    """Exactly representable in f32, f16 and bf16, like the models' weights."""
    t = t.float().bfloat16().float()
    t[t.abs() < 2**-14] = 0
    return t


class Model:
    """The f32 diffusers UNet, VAE and CLIP; `weights[(component, path)]` is the layer's weight
    under its diffusers module path (text encoder paths with `text_model.`)."""

    def __init__(self, sd2=False):
        self.unet, self.vae, self.clip = load_models()
        self.tok, _ = tokenizer()
        self.sd2 = sd2
        if sd2:
            from transformers import CLIPTextModel

            self.clip = CLIPTextModel.from_pretrained(os.path.join(FIX, "tiny-sd2-v", "text_encoder"),
                                                      dtype=torch.float32).eval()
            self.tok.pad_token = "!"

    def module(self, component, path):
        if component == "unet":
            return self.unet.get_submodule(path)
        inner = getattr(self.clip, "text_model", self.clip)
        return inner.get_submodule(path.removeprefix("text_model."))

    def layers(self, component, suffixes):
        if component == "unet":
            names = [n for n, _ in self.unet.named_modules()]
        else:
            inner = getattr(self.clip, "text_model", self.clip)
            names = ["text_model." + n for n, _ in inner.named_modules()]
        return [n for n in names if n.endswith(tuple("." + s for s in suffixes))]

    def render(self):
        gen = torch.Generator("cpu").manual_seed(SEED)
        noise = torch.randn((1, 4, 8, 8), generator=gen)
        with torch.no_grad():
            _, img = pipe_sample(self.unet, self.vae, self.clip, self.tok, "ddim", 0.0, noise, gen, 64, 64)
        return img


# --- random networks ---------------------------------------------------------------------------

def scaled(parts, weight, ratio):
    """Scales every factor of a module by the same c^(1/n) so that std(ΔW·scale) ≈ ratio ·
    std(W), then rounds (ΔW is linear in each factor, so n factors scale it by c)."""
    factors = [k for k in parts if k not in ("alpha", "diff_b")]
    delta, _ = lf.updown(parts, weight)
    c = (ratio * weight.std().item() / delta.std().item()) ** (1 / len(factors))
    return {k: (exact(v * c) if k in factors else v) for k, v in parts.items()}


def lora_parts(gen, weight, rank=RANK, alpha=ALPHA, in_dim=None):
    out, fan = weight.shape[0], in_dim or math.prod(weight.shape[1:])
    down = torch.randn((rank, fan), generator=gen)
    up = torch.randn((out, rank), generator=gen)
    if weight.dim() == 4:  # LoCon: down is a conv with the layer's kernel, up a 1x1 conv
        down, up = down.reshape(rank, weight.shape[1], *weight.shape[2:]), up.reshape(out, rank, 1, 1)
    parts = {"lora_down.weight": down, "lora_up.weight": up}
    if alpha is not None:
        parts["alpha"] = torch.tensor(alpha)
    return parts


def make_lora(model, gen, unet_suffixes, te_suffixes, ratio_unet, ratio_te, alpha=ALPHA):
    net = {}
    for component, suffixes, ratio in (("unet", unet_suffixes, ratio_unet), ("te", te_suffixes, ratio_te)):
        for path in model.layers(component, suffixes):
            w = model.module(component, path).weight.detach()
            net[(component, path)] = scaled(lora_parts(gen, w, alpha=alpha), w, ratio)
    return net


def hada_parts(gen, w, tucker):
    r, out, fan = RANK, w.shape[0], math.prod(w.shape[1:])
    g = lambda *s: torch.randn(s, generator=gen)  # noqa: E731
    if tucker:  # LyCORIS use_tucker on a kxk conv: w*_a [r, out], w*_b [r, in], t* [r, r, kh, kw]
        k = w.shape[2:]
        return {"hada_w1_a": g(r, out), "hada_w1_b": g(r, w.shape[1]), "hada_t1": g(r, r, *k),
                "hada_w2_a": g(r, out), "hada_w2_b": g(r, w.shape[1]), "hada_t2": g(r, r, *k),
                "alpha": torch.tensor(ALPHA)}
    return {"hada_w1_a": g(out, r), "hada_w1_b": g(r, fan), "hada_w2_a": g(out, r), "hada_w2_b": g(r, fan),
            "alpha": torch.tensor(ALPHA)}


def lokr_parts(gen, w, factored, f=4):
    g = lambda *s: torch.randn(s, generator=gen)  # noqa: E731
    out2, in2 = w.shape[0] // f, w.shape[1] // f
    parts = {"lokr_w1": g(f, f), "alpha": torch.tensor(ALPHA)}
    if factored:  # scale = alpha / lokr_w2_b.shape[0]
        parts.update({"lokr_w2_a": g(out2, RANK), "lokr_w2_b": g(RANK, in2 * math.prod(w.shape[2:]))})
    else:  # fully unfactored: A1111's dim is None, so scale = 1.0 whatever alpha says
        parts["lokr_w2"] = g(out2, in2, *w.shape[2:])
    return parts


def make_lycoris(model, gen, kind):
    """(component, path) → parts for the LoHa / LoKr / full-diff fixtures, on a few layers."""
    u = "down_blocks.1.attentions.0.transformer_blocks.0."
    plan = {
        "loha": [("unet", u + "attn1.to_q", False), ("unet", u + "attn2.to_v", False),
                 ("unet", u + "ff.net.0.proj", False), ("unet", "down_blocks.0.attentions.0.proj_in", False),
                 ("unet", "down_blocks.0.resnets.0.conv1", False), ("unet", "mid_block.resnets.0.conv2", False),
                 ("unet", "up_blocks.0.resnets.1.conv_shortcut", False),
                 ("te", "text_model.encoder.layers.0.self_attn.q_proj", False),
                 ("te", "text_model.encoder.layers.1.mlp.fc1", False)],
        "loha_tucker": [("unet", "down_blocks.0.resnets.0.conv1", True), ("unet", "down_blocks.1.resnets.0.conv2", True),
                        ("unet", "mid_block.resnets.1.conv1", True), ("unet", "up_blocks.1.upsamplers.0.conv", True)],
        "lokr": [("unet", u + "attn1.to_k", True), ("unet", u + "ff.net.0.proj", True),
                 ("unet", "down_blocks.0.resnets.1.conv1", True), ("unet", u + "attn1.to_out.0", False),
                 ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2", False),
                 ("unet", "up_blocks.0.resnets.0.conv2", False), ("unet", "down_blocks.1.attentions.0.proj_out", False),
                 ("te", "text_model.encoder.layers.0.self_attn.v_proj", True),
                 ("te", "text_model.encoder.layers.2.self_attn.out_proj", False)],
        "full_diff": [("unet", u + "attn2.to_q", None), ("unet", "mid_block.resnets.0.conv1", None),
                      ("unet", "up_blocks.2.attentions.0.proj_out", None),
                      ("te", "text_model.encoder.layers.1.self_attn.out_proj", None)],
    }[kind]
    net = {}
    for component, path, flag in plan:
        mod = model.module(component, path)
        w = mod.weight.detach()
        ratio = 0.4 if component == "unet" else 0.6
        if kind.startswith("loha"):
            parts = hada_parts(gen, w, flag)
        elif kind == "lokr":
            parts = lokr_parts(gen, w, flag)
        else:
            parts = {"diff": torch.randn(w.shape, generator=gen)}
            if path.endswith("proj_out"):  # one bias update (network_full's diff_b)
                parts["diff_b"] = exact(torch.randn(mod.bias.shape, generator=gen) * mod.bias.std() * ratio)
        net[(component, path)] = scaled(parts, w, ratio)
    return net


# --- merging -----------------------------------------------------------------------------------

def merge(model, net, te_m, unet_m):
    """Adds m · ΔW · scale (and m · diff_b) to the model's f32 weights, A1111's order."""
    with torch.no_grad():
        for (component, path), parts in net.items():
            m = te_m if component == "te" else unet_m
            if m == 0:
                continue
            mod = model.module(component, path)
            delta, ex_bias = lf.updown(parts, mod.weight)
            mod.weight += m * delta
            if ex_bias is not None:
                mod.bias += m * ex_bias.float()


def merged_weight(model, net, key, m=1.0):
    w = model.module(*key).weight.detach().clone()
    return w + m * lf.updown(net[key], w)[0]


# --- files -------------------------------------------------------------------------------------

def kohya_dict(net, dtype, names=lambda n: n):
    out = {}
    for (component, path), parts in net.items():
        name = names(lf.kohya_name(component, path))
        out.update({f"{name}.{k}": v.to(dtype).contiguous() for k, v in parts.items()})
    return out


def peft_dict(net, dtype):
    """StableDiffusionPipeline.save_lora_weights' names (lora_alpha = rank: no alpha key)."""
    prefix = {"unet": "unet.", "te": "text_encoder."}
    ab = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    return {f"{prefix[c]}{p}.{ab[k]}": v.to(dtype).contiguous() for (c, p), parts in net.items() for k, v in parts.items()}


def old_diffusers_dict(net):
    return {lf.old_diffusers_name(c, p, k): v.contiguous() for (c, p), parts in net.items() for k, v in parts.items()}


def write(name, tensors):
    path = os.path.join(LORA_DIR, name)
    if name.endswith(".safetensors"):
        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    return "lora/" + name


def check_compvis_names(net):
    """Every CompVis-style name must be a module of the single file's UNet."""
    sd = load_file(os.path.join(FIX, SD1))
    p = "model.diffusion_model."
    modules = {"lora_unet_" + k[len(p):-len(".weight")].replace(".", "_") for k in sd if k.startswith(p)}
    for component, path in net:
        if component == "unet":
            name = lf.compvis_name(lf.kohya_name(component, path))
            assert name in modules, f"{path} -> {name}: not a CompVis module"


def check_sd2_text_encoder(model):
    """The folder's transformers CLIP holds the single file's OpenCLIP weights (q, k, v fused in
    in_proj), so merging into q_proj/k_proj/v_proj is merging into in_proj's row blocks."""
    sd = load_file(os.path.join(FIX, SD2))
    inner = getattr(model.clip, "text_model", model.clip)
    for i, layer in enumerate(inner.encoder.layers):
        fused = torch.cat([getattr(layer.self_attn, f"{x}_proj").weight for x in "qkv"])
        want = sd[f"cond_stage_model.model.transformer.resblocks.{i}.attn.in_proj_weight"].float()
        assert torch.equal(fused, want), f"SD2 layer {i}: in_proj differs"


# --- references --------------------------------------------------------------------------------

def diffusers_merge(fname, te_m, unet_m):
    """A fresh model with the file fused by diffusers, one component at a time."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from make_fixtures import SD1_SCHEDULER

    model = Model()
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.clip, tokenizer=model.tok, unet=model.unet,
                                   scheduler=DDIMScheduler(**SD1_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(LORA_DIR, weight_name=fname, adapter_name="case")
    for component, m in (("text_encoder", te_m), ("unet", unet_m)):
        if m:
            pipe.fuse_lora(components=[component], lora_scale=m, adapter_names=["case"])
    pipe.unload_lora_weights()
    return model


def assert_same_merge(got, want, net, what):
    """diffusers' fused weights against the script's merge, on every layer the file touches."""
    worst = 0.0
    for key in net:
        a, b = got.module(*key).weight, want.module(*key).weight
        worst = max(worst, (a - b).abs().max().item())
    base = Model()
    moved = max((got.module(*k).weight - base.module(*k).weight).abs().max().item() for k in net)
    print(f"  {what}: diffusers vs script merge max |Δ| {worst:.2e} over {len(net)} layers (largest update {moved:.3f})")
    assert worst < 1e-5, what


def mad(a, b):
    return round(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()), 3)


def tag(name, te_m, unet_m):
    if te_m == unet_m:
        return f"<lora:{name}:{te_m:g}>"
    return f"<lora:{name}:{te_m:g}:{unet_m:g}>"


def case_entry(name, lora_file, fmt, model, te_m, unet_m, made_by, img, base):
    Image.fromarray(img).save(os.path.join(OUT, name + ".png"))
    stem = os.path.splitext(os.path.basename(lora_file))[0]
    t = tag(stem, te_m, unet_m) if stem else ""
    entry = {"name": name, "lora": lora_file, "format": fmt, "model": model, "te_multiplier": te_m,
             "unet_multiplier": unet_m, "tag": t, "prompt": f"{PROMPT} {t}".strip(), "base_prompt": PROMPT,
             "negative_prompt": NEGATIVE, "seed": SEED, "sampler": "ddim", "schedule": "normal", "eta": 0.0,
             "steps": STEPS, "width": 64, "height": 64, "cfg_scale": CFG, "file": f"lora/{name}.png",
             "mad_vs_base": mad(img, base), "reference": made_by}
    print(f"  {name}: {t} mad_vs_base {entry['mad_vs_base']}")
    return entry


def main():
    shutil.rmtree(LORA_DIR, ignore_errors=True)
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(LORA_DIR)
    os.makedirs(OUT)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(300)
    sd1 = Model()
    kohya = make_lora(sd1, gen, UNET_ATTN + UNET_CONV, TE, 0.25, 0.5)
    peft = make_lora(sd1, gen, ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"), TE[:4], 0.3, 0.5, alpha=None)
    old = make_lora(sd1, gen, ("to_q", "to_k", "to_v", "to_out.0"), TE[:4], 0.3, 0.5, alpha=None)
    lyco = {k: make_lycoris(sd1, gen, k) for k in ("loha", "loha_tucker", "lokr", "full_diff")}
    check_compvis_names(kohya)

    files = {
        "kohya_locon": write("kohya_locon.safetensors", kohya_dict(kohya, torch.float16)),
        "kohya_compvis_names": write("kohya_compvis_names.safetensors",
                                     kohya_dict(kohya, torch.float16, lf.compvis_name)),
        "kohya_locon_pickle": write("kohya_locon_pickle.pt", kohya_dict(kohya, torch.bfloat16)),
        "peft": write("peft.safetensors", peft_dict(peft, torch.float16)),
        "old_diffusers": write("old_diffusers.bin", old_diffusers_dict(old)),
        "loha": write("loha.safetensors", kohya_dict(lyco["loha"], torch.float16)),
        "loha_tucker": write("loha_tucker.safetensors", kohya_dict(lyco["loha_tucker"], torch.float16)),
        "lokr": write("lokr.safetensors", kohya_dict(lyco["lokr"], torch.float32)),
        "full_diff": write("full_diff.safetensors", kohya_dict(lyco["full_diff"], torch.float16)),
    }

    base = sd1.render()
    Image.fromarray(base).save(os.path.join(OUT, "base.png"))
    cases = [dict(case_entry("base", "", "none", SD1, 0.0, 0.0, "no network", base, base), lora=None)]

    # diffusers' own loader, multipliers per component
    for name, fmt, net in (("kohya_locon", "kohya LoCon", kohya), ("peft", "diffusers PEFT", peft)):
        fname = os.path.basename(files[name])
        for m in (0.5, 1.3):
            for te_m, unet_m, which in ((m, 0.0, "te"), (0.0, m, "unet"), (m, m, "both")):
                got = diffusers_merge(fname, te_m, unet_m)
                want = Model()
                merge(want, net, te_m, unet_m)
                assert_same_merge(got, want, net, f"{name} te {te_m} unet {unet_m}")
                cases.append(case_entry(f"{name}_{which}_{m:g}", files[name], fmt, SD1, te_m, unet_m,
                                        DIFFUSERS_REF, got.render(), base))

    # the script's merge
    script_cases = [("kohya_compvis_names", "kohya LoCon, CompVis UNet names", kohya, 1.0),
                    ("kohya_locon_pickle", "kohya LoCon, torch pickle", kohya, 1.0),
                    ("old_diffusers", "diffusers attention processors (pickle)", old, 1.0),
                    ("loha", "LyCORIS LoHa", lyco["loha"], 1.0), ("loha", "LyCORIS LoHa", lyco["loha"], 0.5),
                    ("loha_tucker", "LyCORIS LoHa, Tucker", lyco["loha_tucker"], 1.0),
                    ("lokr", "LyCORIS LoKr", lyco["lokr"], 1.0),
                    ("full_diff", "LyCORIS full (diff, diff_b)", lyco["full_diff"], 1.0)]
    for name, fmt, net, m in script_cases:
        model = Model()
        merge(model, net, m, m)
        label = name if m == 1.0 else f"{name}_{m:g}"
        if name == "old_diffusers":  # diffusers still reads this format: a free cross-check
            assert_same_merge(diffusers_merge(os.path.basename(files[name]), m, m), model, net, name)
        cases.append(case_entry(label, files[name], fmt, SD1, m, m, SCRIPT_REF, model.render(), base))

    # SD 2: kohya names for the transformers text encoder, merged into OpenCLIP's fused in_proj
    sd2 = Model(sd2=True)
    check_sd2_text_encoder(sd2)
    sd2_net = make_lora(sd2, gen, ("to_q", "to_v", "to_out.0", "proj_in", "conv1", "conv2"), TE, 0.25, 0.5)
    files["sd2_kohya"] = write("sd2_kohya.safetensors", kohya_dict(sd2_net, torch.float16))
    sd2_base = sd2.render()
    Image.fromarray(sd2_base).save(os.path.join(OUT, "sd2_base.png"))
    cases.append(dict(case_entry("sd2_base", "", "none", SD2, 0.0, 0.0, "no network", sd2_base, sd2_base), lora=None))
    merge(sd2, sd2_net, 1.0, 1.0)
    cases.append(case_entry("sd2_kohya", files["sd2_kohya"], "kohya LoRA, SD 2 text encoder names", SD2,
                            1.0, 1.0, SCRIPT_REF, sd2.render(), sd2_base))

    # a file for a wider context (attn2.to_k/to_v take 64 features, the tiny models give 32)
    mismatch = {}
    for path in sd1.layers("unet", ("attn2.to_k", "attn2.to_v")):
        w = sd1.module("unet", path).weight
        mismatch[("unet", path)] = {k: exact(v * 0.1) for k, v in lora_parts(gen, w, in_dim=64).items()}
    write("sd2_for_sd1_mismatch.safetensors", kohya_dict(mismatch, torch.float16))

    write_weights(kohya, lyco, sd2_net)
    doc = {"cases": cases, "versions": versions(), "rank": RANK, "alpha": ALPHA,
           "mismatch": {"lora": "lora/sd2_for_sd1_mismatch.safetensors", "model": SD1,
                        "expect": "error: attn2.to_k/to_v lora_down take 64 input features, the model's layers 32"}}
    with open(os.path.join(REF, "lora.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(LORA_DIR, n)) for n in os.listdir(LORA_DIR))
    print(f"  {len(cases)} cases; tests/fixtures/lora/ holds {total} bytes")


def write_weights(kohya, lyco, sd2_net):
    """Merged f32 weights (multiplier 1) under "<case>/<diffusers weight name>"."""
    model, sd2 = Model(), Model(sd2=True)
    picks = [("kohya_locon", kohya, model, ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")),
             ("kohya_locon", kohya, model, ("unet", "down_blocks.0.resnets.0.conv1")),
             ("kohya_locon", kohya, model, ("te", "text_model.encoder.layers.0.self_attn.q_proj")),
             ("loha", lyco["loha"], model, ("unet", "down_blocks.0.resnets.0.conv1")),
             ("loha_tucker", lyco["loha_tucker"], model, ("unet", "down_blocks.0.resnets.0.conv1")),
             ("lokr", lyco["lokr"], model, ("unet", "down_blocks.0.resnets.1.conv1")),
             ("lokr", lyco["lokr"], model, ("unet", "up_blocks.0.resnets.0.conv2")),
             ("full_diff", lyco["full_diff"], model, ("unet", "up_blocks.2.attentions.0.proj_out"))]
    out = {}
    for case, net, m, key in picks:
        out[f"{case}/{key[1]}.weight"] = merged_weight(m, net, key)
    mod = model.module("unet", "up_blocks.2.attentions.0.proj_out")
    out["full_diff/up_blocks.2.attentions.0.proj_out.bias"] = mod.bias.detach() + lyco["full_diff"][
        ("unet", "up_blocks.2.attentions.0.proj_out")]["diff_b"].float()
    # SD 2: the merged q/k/v stacked the way OpenCLIP's fused in_proj holds them
    fused = [merged_weight(sd2, sd2_net, ("te", f"text_model.encoder.layers.0.self_attn.{x}_proj")) for x in "qkv"]
    out["sd2_kohya/cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] = torch.cat(fused)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(REF, "lora_weights.safetensors"))


if __name__ == "__main__":
    main()
