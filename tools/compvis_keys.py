"""Diffusers -> CompVis (original Stable Diffusion) state-dict key conversion for SD1 models.

This is the inverse of diffusers' single-file converter (`diffusers.loaders.single_file_utils`):
`make_fixtures.py` writes single-file checkpoints with it and validates them by converting back
with diffusers' own functions."""

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# Resnet parameter names, diffusers -> CompVis (UNet).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _split(key, n):
    parts = key.split(".")
    return parts[:n], ".".join(parts[n:])


def _resnet(rest):
    name, tail = rest.split(".", 1)
    return f"{_UNET_RESNET[name]}.{tail}"


def unet_to_compvis(sd, layers_per_block):
    """Maps a diffusers UNet2DConditionModel state dict to CompVis names (without prefix)."""
    per = layers_per_block + 1
    has_up_attn = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for key, value in sd.items():
        new = None
        for src, dst in _UNET_TOP.items():
            if key.startswith(src + "."):
                new = dst + key[len(src) :]
        if new is None and key.startswith("down_blocks."):
            (_, b, kind, idx), rest = _split(key, 4)
            b, idx = int(b), int(idx)
            if kind == "resnets":
                new = f"input_blocks.{1 + b * per + idx}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * per + idx}.1.{rest}"
            elif kind == "downsamplers":
                new = f"input_blocks.{1 + b * per + layers_per_block}.0.op.{rest.split('.', 1)[1]}"
        elif new is None and key.startswith("mid_block."):
            (_, kind, idx), rest = _split(key, 3)
            if kind == "resnets":
                new = f"middle_block.{2 * int(idx)}.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"middle_block.1.{rest}"
        elif new is None and key.startswith("up_blocks."):
            (_, b, kind, idx), rest = _split(key, 4)
            b, idx = int(b), int(idx)
            if kind == "resnets":
                new = f"output_blocks.{b * per + idx}.0.{_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{b * per + idx}.1.{rest}"
            elif kind == "upsamplers":
                slot = 2 if b in has_up_attn else 1
                new = f"output_blocks.{b * per + layers_per_block}.{slot}.{rest}"
        if new is None:
            raise KeyError(f"unmapped UNet key {key}")
        out[new] = value
    return out


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest):
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_to_compvis(sd, num_blocks):
    """Maps a diffusers AutoencoderKL state dict to CompVis names (without prefix).

    CompVis numbers decoder levels from the lowest resolution up: `decoder.up.{n-1-i}` is
    diffusers' `decoder.up_blocks.{i}`. Attention projections become 1x1 conv weights."""
    out = {}
    for key, value in sd.items():
        part, rest = key.split(".", 1)
        new = None
        if part in ("quant_conv", "post_quant_conv"):
            new = key
        elif rest.startswith(("conv_in.", "conv_out.")):
            new = key
        elif rest.startswith("conv_norm_out."):
            new = f"{part}.norm_out.{rest.split('.', 1)[1]}"
        elif rest.startswith(("down_blocks.", "up_blocks.")):
            (kind, b, sub, idx), tail = _split(rest, 4)
            b = int(b)
            level = f"down.{b}" if kind == "down_blocks" else f"up.{num_blocks - 1 - b}"
            if sub == "resnets":
                new = f"{part}.{level}.block.{idx}.{_vae_resnet(tail)}"
            elif sub in ("downsamplers", "upsamplers"):
                name = "downsample" if sub == "downsamplers" else "upsample"
                new = f"{part}.{level}.{name}.{tail}"
        elif rest.startswith("mid_block."):
            (_, sub, idx), tail = _split(rest, 3)
            if sub == "resnets":
                new = f"{part}.mid.block_{int(idx) + 1}.{_vae_resnet(tail)}"
            elif sub == "attentions":
                for src, dst in _VAE_ATTN.items():
                    if tail.startswith(src + "."):
                        new = f"{part}.mid.attn_1.{dst}{tail[len(src):]}"
                if value.dim() == 2:
                    value = value[:, :, None, None]
        if new is None:
            raise KeyError(f"unmapped VAE key {key}")
        out[new] = value
    return out


def clip_to_compvis(sd):
    """CLIP text model keys under `text_model.` (transformers 5 omits that prefix when saving)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def sd1_extra_keys():
    """The non-weight tensors a real SD1 checkpoint carries (DDPM buffers, EMA counters)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    extra = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        "model_ema.decay": torch.tensor(0.9999, dtype=torch.float64),
    }
    extra = {k: v.float() for k, v in extra.items()}
    extra["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    extra[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return extra


def to_compvis(unet_sd, vae_sd, clip_sd, layers_per_block, vae_blocks, dtype):
    """A full single-file SD1 checkpoint: weights cast to `dtype`, extra buffers in f32/int (cast
    to `dtype` too when it is a half type, as pruned half-precision checkpoints do)."""
    out = {}
    for k, v in unet_to_compvis(unet_sd, layers_per_block).items():
        out[UNET_PREFIX + k] = v.to(dtype)
    for k, v in vae_to_compvis(vae_sd, vae_blocks).items():
        out[VAE_PREFIX + k] = v.to(dtype)
    for k, v in clip_to_compvis(clip_sd).items():
        out[CLIP_PREFIX + k] = v.to(dtype)
    for k, v in sd1_extra_keys().items():
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return {k: v.contiguous() for k, v in out.items()}
