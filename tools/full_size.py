"""A random-weight model with the full SD 1.5 architecture, as a CompVis single file in f16
(~2 GB), for benchmarks: timings depend on shapes only, not on trained weights."""

import time

import torch

import compvis_keys
from make_fixtures import assert_same, round_params, save_st

CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)

VAE = dict(
    in_channels=3,
    out_channels=3,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)


def write(path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    start = time.time()
    torch.manual_seed(1)
    clip = round_params(CLIPTextModel(CLIPTextConfig(**CLIP))).state_dict()
    torch.manual_seed(2)
    unet = round_params(UNet2DConditionModel(**UNET)).state_dict()
    torch.manual_seed(3)
    vae = round_params(AutoencoderKL(**VAE)).state_dict()
    sd = compvis_keys.to_compvis(unet, vae, clip, UNET["layers_per_block"], len(VAE["block_out_channels"]), torch.float16)
    check(sd, unet, vae, clip)
    del unet, vae, clip
    save_st(sd, path)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {path}: {len(sd)} tensors, {n / 1e6:.0f} M values, {time.time() - start:.0f} s")


def check(sd, unet, vae, clip):
    """Converts back with diffusers' own single-file converter: names and values must match."""
    from diffusers.loaders import single_file_utils as sfu

    assert_same(unet, sfu.convert_ldm_unet_checkpoint(sd, UNET), "full-size unet")
    assert_same(vae, sfu.convert_ldm_vae_checkpoint(sd, VAE), "full-size vae")
    assert_same(compvis_keys.clip_to_compvis(clip), sfu.convert_ldm_clip_checkpoint(sd), "full-size clip")
