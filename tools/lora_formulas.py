"""The weight update of each LoRA/LyCORIS module type, as A1111's extensions-builtin/Lora
computes it (network_lora.py, network_hada.py, network_lokr.py, network_full.py,
lyco_helpers.py, network.py's finalize_updown), and the key-name maps the fixtures use.

A module is a dict of A1111's "network parts" (the key after the first '.': `lora_down.weight`,
`hada_w1_a`, `alpha`, ...). `updown(parts, weight)` returns (ΔW · scale, ex_bias) before the
multiplier; the caller adds `m · ΔW` to the weight and `m · ex_bias` to the bias."""

import re

import torch


def make_weight_cp(t, wa, wb):
    """lyco_helpers.make_weight_cp: Tucker core t [r, r, kh, kw], wa [r, out], wb [r, in]."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def rebuild_conventional(up, down, shape):
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    return (up @ down).reshape(shape)


def _lora(w, orig):
    up, down = w["lora_up.weight"], w["lora_down.weight"]
    shape = [up.size(0), down.size(1)] + (list(down.shape[2:]) if down.dim() == 4 else [])
    return rebuild_conventional(up, down, shape), down.shape[0], None


def _hada(w, orig):
    w1a, w1b, w2a, w2b = (w[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    shape = [w1a.size(0), w1b.size(1)]
    if "hada_t1" in w:
        shape = [w1a.size(1), w1b.size(1)] + list(w["hada_t1"].shape[2:])
        up1 = make_weight_cp(w["hada_t1"], w1a, w1b)
    else:
        if w1b.dim() == 4:
            shape += list(w1b.shape[2:])
        up1 = rebuild_conventional(w1a, w1b, shape)
    if "hada_t2" in w:
        up2 = make_weight_cp(w["hada_t2"], w2a, w2b)
    else:
        up2 = rebuild_conventional(w2a, w2b, shape)
    return up1 * up2, w1b.shape[0], None


def _lokr(w, orig):
    dim = None
    if "lokr_w1" in w:
        w1 = w["lokr_w1"]
    else:
        w1, dim = w["lokr_w1_a"] @ w["lokr_w1_b"], w["lokr_w1_b"].shape[0]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    else:
        w2, dim = w["lokr_w2_a"] @ w["lokr_w2_b"], w["lokr_w2_b"].shape[0]
    shape = list(orig.shape) if orig.dim() == 4 else [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous()).reshape(shape), dim, None


def _full(w, orig):
    return w["diff"], None, w.get("diff_b")


def module_type(w):
    if "lora_up.weight" in w:
        return "lora"
    if "hada_w1_a" in w:
        return "hada"
    if any(k.startswith("lokr_") for k in w):
        return "lokr"
    if "diff" in w:
        return "full"
    raise ValueError(f"no module type takes {sorted(w)}")


def updown(w, orig):
    """(ΔW · scale, ex_bias) for one module; scale = alpha / dim, 1.0 when either is absent."""
    w = {k: v.float() for k, v in w.items()}
    delta, dim, ex_bias = {"lora": _lora, "hada": _hada, "lokr": _lokr, "full": _full}[module_type(w)](w, orig)
    scale = w["alpha"].item() / dim if dim is not None and "alpha" in w else 1.0
    if delta.numel() == orig.numel():
        delta = delta.reshape(orig.shape)
    return delta * scale, ex_bias


# --- names -------------------------------------------------------------------------------------

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
           "conv_shortcut": "skip_connection"}


def kohya_name(component, path):
    """`lora_unet_down_blocks_0_...` / `lora_te_text_model_encoder_layers_0_...`."""
    return ("lora_unet_" if component == "unet" else "lora_te_") + path.replace(".", "_")


def compvis_name(kohya):
    """A1111's convert_diffusers_name_to_compvis, spelled with `lora_unet_` in front (LyCORIS
    and some trainers write UNet keys this way; A1111 finds them by replacing `lora_unet` with
    `diffusion_model`). Text-encoder names are unchanged."""
    def m(pattern):
        r = re.match(pattern, kohya)
        return [int(x) if x.isdigit() else x for x in r.groups()] if r else None

    if g := m(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _RESNET.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return f"lora_unet_input_blocks_{1 + g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if g := m(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _RESNET.get(g[2], g[2]) if g[0] == "resnets" else g[2]
        return f"lora_unet_middle_block_{1 if g[0] == 'attentions' else g[1] * 2}_{suffix}"
    if g := m(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = _RESNET.get(g[3], g[3]) if g[1] == "resnets" else g[3]
        return f"lora_unet_output_blocks_{g[0] * 3 + g[2]}_{1 if g[1] == 'attentions' else 0}_{suffix}"
    if g := m(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"lora_unet_input_blocks_{3 + g[0] * 3}_0_op"
    if g := m(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"lora_unet_output_blocks_{2 + g[0] * 3}_{2 if g[0] > 0 else 1}_conv"
    assert kohya.startswith("lora_te_"), kohya
    return kohya


def old_diffusers_name(component, path, part):
    """The attention-processor format diffusers 0.14-0.20 saved (`pytorch_lora_weights.bin`)."""
    updown = {"lora_down.weight": "down.weight", "lora_up.weight": "up.weight"}[part]
    if component == "unet":
        block, proj = re.match(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out\.0)$", path).groups()
        proj = "to_out" if proj == "to_out.0" else proj
        return f"unet.{block}.processor.{proj}_lora.{updown}"
    return f"text_encoder.{path}.lora_linear_layer.{updown}"
