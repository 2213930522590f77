"""A random-weight model with the full SD 1.5 architecture, as a CompVis single file in f16
(~2 GB), for benchmarks: timings depend on shapes only, not on trained weights.

With `--sdxl`, the full SDXL base 1.0 architecture instead (two text encoders, the text_time
UNet, the 0.13025 VAE) as an SGM single file in f16 (~7 GB), named as
`make_sdxl_fixtures.py` names its tiny one.

    /tmp/torchenv/bin/python tools/full_size.py /tmp/sd15-random.safetensors          # ~30 s, 7 GB RAM
    /tmp/torchenv/bin/python tools/full_size.py --sdxl /tmp/sdxl-random.safetensors   # see write_sdxl
"""

import argparse
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


# SDXL base 1.0 (diffusers' stabilityai/stable-diffusion-xl-base-1.0 configs). Head counts are
# width / 64 everywhere, which is also what sdrs infers from a single file.
SDXL_TE1 = dict(CLIP, projection_dim=768)
SDXL_TE2 = dict(
    CLIP,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    pad_token_id=1,
    projection_dim=1280,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def _finite(name, t):
    t = t.float()
    assert torch.isfinite(t).all(), f"{name}: not finite"
    print(f"  {name}: {tuple(t.shape)} finite, mean {t.mean():.4f}, std {t.std():.4f}, max |x| {t.abs().max():.3f}")


def _open_clip_state(te2):
    """make_sdxl_fixtures.open_clip_state, whose layer count is the tiny model's global."""
    import make_sdxl_fixtures as tiny

    saved = tiny.TE2_CFG
    tiny.TE2_CFG = dict(saved, num_hidden_layers=te2.config.num_hidden_layers)
    try:
        return tiny.open_clip_state(te2)
    finally:
        tiny.TE2_CFG = saved


def write_sdxl(path):
    """One network at a time: built in f32 with the libraries' default init (rounded as the
    fixtures are), run once in f32 (both encoders on a prompt, the UNet at a 64x64 latent on
    their output, the VAE at 32x32) to check the activations stay finite, then turned to f16 in
    place (the f32 copy goes), named as SGM and checked against diffusers' converters. Peak RAM
    is the f32 UNet (10.3 GB) plus the f16 text encoders; ~7 GB on disk, 3.5 G values."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import make_sdxl_fixtures as tiny

    start = time.time()
    sd = {}

    def add(prefix, part):
        for k, v in part.items():
            sd[prefix + k] = v.half().contiguous()

    ids = torch.full((1, 77), 49407, dtype=torch.long)
    ids[0, :12] = torch.tensor([49406] + list(range(320, 330)) + [49407])
    with torch.no_grad():
        torch.manual_seed(11)
        te1 = round_params(CLIPTextModel(CLIPTextConfig(**SDXL_TE1)))
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        _finite("te1 penultimate", h1)
        te1.half()
        add(tiny.TE1_PREFIX, compvis_keys.clip_to_compvis(te1.state_dict()))
        assert_same(compvis_keys.clip_to_compvis(te1.state_dict()),
                    sfu.convert_ldm_clip_checkpoint(sd, remove_prefix=tiny.TE1_PREFIX), "sdxl text_encoder")
        del te1

        torch.manual_seed(12)
        te2 = round_params(CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TE2)))
        out2 = te2(ids, output_hidden_states=True)
        h2, pooled = out2.hidden_states[-2], out2.text_embeds
        _finite("te2 penultimate", h2)
        _finite("te2 pooled", pooled)
        te2.half()
        add(tiny.TE2_PREFIX, _open_clip_state(te2))
        te2_sd = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
                  for k, v in te2.state_dict().items()}
        assert_same(te2_sd, sfu.convert_open_clip_checkpoint(te2, sd, prefix=tiny.TE2_PREFIX), "sdxl text_encoder_2")
        del te2, te2_sd, out2

        torch.manual_seed(13)
        t = time.time()
        unet = round_params(UNet2DConditionModel(**SDXL_UNET))
        print(f"  unet built: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, {time.time() - t:.0f} s")
        t = time.time()
        x = torch.randn((1, 4, 64, 64), generator=torch.Generator().manual_seed(1))
        time_ids = torch.tensor([[512.0, 512, 0, 0, 512, 512]])
        eps = unet(x, 500, encoder_hidden_states=torch.cat([h1, h2], -1),
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        _finite(f"unet eps at 64x64 ({time.time() - t:.0f} s)", eps)
        unet.half()
        add(tiny.UNET_PREFIX, tiny.unet_to_sgm(unet.state_dict()))
        assert_same(unet.state_dict(), sfu.convert_ldm_unet_checkpoint(sd, SDXL_UNET), "sdxl unet")
        del unet

        torch.manual_seed(14)
        vae = round_params(AutoencoderKL(**SDXL_VAE))
        latent = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(2))
        _finite("vae decode at 32x32", vae.decode(latent / SDXL_VAE["scaling_factor"]).sample)
        vae.half()
        add(tiny.VAE_PREFIX, compvis_keys.vae_to_compvis(vae.state_dict(), len(SDXL_VAE["block_out_channels"])))
        assert_same(vae.state_dict(), sfu.convert_ldm_vae_checkpoint(sd, SDXL_VAE), "sdxl vae")
        del vae

    save_st(sd, path)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {path}: {len(sd)} tensors, {n / 1e6:.0f} M values, {time.time() - start:.0f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--sdxl", action="store_true", help="SDXL base 1.0's architecture (SGM single file) instead of SD 1.5")
    args = p.parse_args()
    (write_sdxl if args.sdxl else write)(args.out)


if __name__ == "__main__":
    main()
