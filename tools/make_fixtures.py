"""Makes the tiny random-weight SD1 test models under tests/fixtures/ and records the Python
reference's outputs (diffusers, transformers, k-diffusion) for the Rust tests.

    /opt/venv/bin/python tools/make_fixtures.py            # everything (~15 s)
    /opt/venv/bin/python tools/make_fixtures.py --no-txt2img
    /opt/venv/bin/python tools/make_fixtures.py --full-size OUT.safetensors   # benchmark model only

Deterministic: every model and input comes from a fixed seed, so re-running rewrites the same
bytes. See tools/README.md."""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compvis_keys  # noqa: E402
from clip_vocab import write_hf_tokenizer  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
REF = os.path.join(FIX, "reference")

SD1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

CLIP_CFG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
CLIP4_CFG = dict(CLIP_CFG, num_attention_heads=4, num_hidden_layers=2)

UNET_CFG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=32,
)

VAE_CFG = dict(
    in_channels=3,
    out_channels=3,
    sample_size=64,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)

# A random-init UNet predicts eps with std ~0.3, so sampling barely depends on it and different
# samplers give near-identical images. Scaling its output conv by 4 (a power of two: rounding
# stays exact) gives eps std ~1.26, like a trained model, and images that tell samplers apart.
# The random VAE decoder needs no help: its images already have a healthy spread (see README).
UNET_SCALES = {"conv_out.weight": 4.0, "conv_out.bias": 4.0}

SEEDS = {"clip": 1, "unet": 2, "vae": 3, "clip4": 4, "vae_alt": 5}

PROMPT = "a tiny red fox in the snow"
LONG_PROMPT = (
    "a highly detailed oil painting of a lighthouse on a rocky cliff at sunset, dramatic clouds, "
    "crashing waves, seagulls flying over the water, warm golden light, volumetric fog, "
    "intricate brush strokes, trending on artstation, by a famous old master painter, "
    "with a small wooden boat in the foreground, a red flag on its mast, fishermen pulling nets, "
    "and a distant village with tiny lit windows along the shore under a rising full moon"
)
CLIP_PROMPTS = ["", PROMPT, "A photo of an astronaut riding a horse, (masterpiece:1.2)!", LONG_PROMPT]


def versions():
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def round_params(model, scales=None):
    """Makes every parameter exactly representable in f32, f16 and bf16."""
    scales = scales or {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            w = p.data.float() * scales.get(name, 1.0)
            w = w.bfloat16().float()
            w[w.abs() < 2**-14] = 0
            p.data.copy_(w)
    return model.eval()


def make_clip(cfg, seed):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return round_params(CLIPTextModel(CLIPTextConfig(**cfg)))


def make_unet(cfg, seed):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return round_params(UNet2DConditionModel(**cfg), UNET_SCALES)


def make_vae(cfg, seed):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return round_params(AutoencoderKL(**cfg))


def save_st(tensors, path, metadata=None):
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def save_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def tokenizer():
    from transformers import CLIPTokenizer

    tmp = tempfile.mkdtemp()
    write_hf_tokenizer(tmp)
    tok = CLIPTokenizer.from_pretrained(tmp)
    return tok, tmp


def model_index():
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_diffusers_dirs(unet, vae, clip, tok_dir):
    from diffusers import DDIMScheduler

    for name, dtype, safe in (("tiny-sd1", torch.float16, True), ("tiny-sd1-bin", torch.bfloat16, False)):
        out = os.path.join(FIX, name)
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        save_json(model_index(), os.path.join(out, "model_index.json"))
        if safe:
            copy.deepcopy(unet).to(dtype).save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
            copy.deepcopy(vae).to(dtype).save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
        else:
            # The reader takes the same pickle path for every component, so one `.bin` (the
            # text encoder) covers it; the UNet and VAE are links to the safetensors folder's,
            # which keeps the fixtures small (git stores the links as links).
            for sub in ("unet", "vae"):
                os.symlink(os.path.join("..", "tiny-sd1", sub), os.path.join(out, sub))
        DDIMScheduler(**SD1_SCHEDULER).save_pretrained(os.path.join(out, "scheduler"))
        os.makedirs(os.path.join(out, "tokenizer"))
        shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), os.path.join(out, "tokenizer"))
        te_dir = os.path.join(out, "text_encoder")
        te = copy.deepcopy(clip).to(dtype)
        if safe:
            te.save_pretrained(te_dir)
        else:
            # transformers 5 only writes safetensors; write the pickle the way transformers 4 did,
            # with the `text_model.` prefix real SD repositories carry.
            te.config.save_pretrained(te_dir)
            sd = compvis_keys.clip_to_compvis(te.state_dict())
            torch.save({k: v.contiguous() for k, v in sd.items()}, os.path.join(te_dir, "pytorch_model.bin"))


def check_diffusers_dirs(unet, vae, clip):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for name in ("tiny-sd1", "tiny-sd1-bin"):
        d = os.path.join(FIX, name)
        pairs = (
            (unet, UNet2DConditionModel.from_pretrained(d, subfolder="unet")),
            (vae, AutoencoderKL.from_pretrained(d, subfolder="vae")),
            (clip, CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"))),
        )
        for ref, got in pairs:
            assert_same(ref.state_dict(), got.state_dict(), f"{name}/{type(ref).__name__}")


def assert_same(ref, got, what):
    ref = {k: v for k, v in ref.items() if k.endswith(("weight", "bias"))}
    missing = set(ref) - set(got)
    assert not missing, f"{what}: missing {sorted(missing)[:5]}"
    for k, v in ref.items():
        g = got[k].float().reshape(v.shape)
        assert torch.equal(v.float(), g), f"{what}: {k} differs"
    print(f"  ok {what}: {len(ref)} tensors equal")


def write_single_files(unet, vae, clip, vae_alt):
    lpb, nblocks = UNET_CFG["layers_per_block"], len(VAE_CFG["block_out_channels"])
    sds = (unet.state_dict(), vae.state_dict(), clip.state_dict())
    # f16 like most published single files; f32 storage is covered by tiny-vae.safetensors.
    save_st(compvis_keys.to_compvis(*sds, lpb, nblocks, torch.float16), os.path.join(FIX, "tiny-sd1.safetensors"))
    bf = compvis_keys.to_compvis(*sds, lpb, nblocks, torch.bfloat16)
    torch.save({"state_dict": bf, "global_step": 0}, os.path.join(FIX, "tiny-sd1.ckpt"))
    # A bare-dict (no `state_dict` wrapper) f16 pickle; the VAE alone keeps it small and is how
    # separate `.ckpt` VAE files ship (`first_stage_model.*` names).
    vae_only = {k: v for k, v in compvis_keys.to_compvis(*sds, lpb, nblocks, torch.float16).items()
                if k.startswith(compvis_keys.VAE_PREFIX)}
    torch.save(vae_only, os.path.join(FIX, "tiny-vae-nowrap.ckpt"))
    alt = compvis_keys.vae_to_compvis(vae_alt.state_dict(), nblocks)
    save_st({k: v.float() for k, v in alt.items()}, os.path.join(FIX, "tiny-vae.safetensors"))


def validate_single_file(unet, vae, clip):
    """Converts the single file back with diffusers' own converter: every tensor must match."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file

    ckpt = load_file(os.path.join(FIX, "tiny-sd1.safetensors"))
    assert_same(unet.state_dict(), sfu.convert_ldm_unet_checkpoint(ckpt, dict(unet.config)), "single-file unet")
    assert_same(vae.state_dict(), sfu.convert_ldm_vae_checkpoint(ckpt, dict(vae.config)), "single-file vae")
    clip_sd = compvis_keys.clip_to_compvis(clip.state_dict())
    assert_same(clip_sd, sfu.convert_ldm_clip_checkpoint(ckpt), "single-file clip")
    n_conv = len(unet.state_dict()) + len(vae.state_dict()) + len(clip_sd) + len(compvis_keys.sd1_extra_keys())
    assert n_conv == len(ckpt), f"{len(ckpt)} keys in the single file, {n_conv} expected"
    alt = load_file(os.path.join(FIX, "tiny-vae.safetensors"))
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in alt)
    sd = torch.load(os.path.join(FIX, "tiny-sd1.ckpt"), weights_only=True)["state_dict"]
    assert_same(unet.state_dict(), sfu.convert_ldm_unet_checkpoint(sd, dict(unet.config)), "tiny-sd1.ckpt unet")
    sd = torch.load(os.path.join(FIX, "tiny-vae-nowrap.ckpt"), weights_only=True)
    assert all(k.startswith(compvis_keys.VAE_PREFIX) for k in sd), "tiny-vae-nowrap.ckpt: non-VAE keys"
    assert_same(vae.state_dict(), sfu.convert_ldm_vae_checkpoint(sd, dict(vae.config)), "tiny-vae-nowrap.ckpt")
    validate_from_single_file(unet, vae)


def validate_from_single_file(unet, vae):
    """The public loader, offline, with the tiny diffusers folder as the config source."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = os.path.join(FIX, "tiny-sd1.safetensors")
    cfg = os.path.join(FIX, "tiny-sd1")
    for cls, ref, sub in ((UNet2DConditionModel, unet, "unet"), (AutoencoderKL, vae, "vae")):
        try:
            got = cls.from_single_file(path, config=cfg, subfolder=sub, local_files_only=True)
        except Exception as e:  # offline loaders may still want the hub; the converter check stands
            print(f"  from_single_file({sub}) unavailable offline: {type(e).__name__}: {str(e)[:200]}")
            continue
        assert_same(ref.state_dict(), got.state_dict(), f"from_single_file {sub}")


def clip_reference(clip, tok, path):
    ids = tok(CLIP_PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = clip(ids, output_hidden_states=True)
        skip2 = getattr(clip, "text_model", clip).final_layer_norm(out.hidden_states[-2])
    save_st(
        {"input_ids": ids.long(), "last_hidden_state": out.last_hidden_state, "clip_skip2": skip2},
        os.path.join(REF, path + ".safetensors"),
    )
    return ids


def unet_reference(unet):
    g = torch.Generator().manual_seed(100)
    sample = torch.randn((2, 4, 8, 8), generator=g)
    ehs = torch.randn((2, 77, 32), generator=g)
    sample_ns = torch.randn((1, 4, 10, 6), generator=g)
    t = {"out_999": 999.0, "out_500_5": 500.5, "out_1": 1.0}
    res = {"sample": sample, "encoder_hidden_states": ehs, "sample_ns": sample_ns}
    with torch.no_grad():
        for k, v in t.items():
            res[k] = unet(sample, torch.tensor([v, v]), encoder_hidden_states=ehs).sample
        res["out_ns"] = unet(sample_ns, torch.tensor([321.0]), encoder_hidden_states=ehs[:1]).sample
    # One metadata entry only: safetensors writes several in hash order, which varies per run.
    save_st(res, os.path.join(REF, "unet.safetensors"), {"timesteps": json.dumps(dict(t, out_ns=321.0))})
    return res


def vae_reference(vae, vae_alt):
    g = torch.Generator().manual_seed(200)
    latent = torch.randn((1, 4, 8, 8), generator=g)
    latent_ns = torch.randn((1, 4, 6, 10), generator=g)
    image = torch.rand((1, 3, 64, 64), generator=g) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        res = {
            "latent": latent,
            "decoded": vae.decode(latent).sample,
            "latent_ns": latent_ns,
            "decoded_ns": vae.decode(latent_ns).sample,
            "image": image,
            "encoded_mean": dist.mean,
            "encoded_std": dist.std,
        }
        alt = {"latent": latent, "decoded": vae_alt.decode(latent).sample}
    save_st(res, os.path.join(REF, "vae.safetensors"))
    save_st(alt, os.path.join(REF, "vae_alt.safetensors"))
    return res, alt


def schedules_reference(kext):
    from diffusers import DDIMScheduler, PNDMScheduler

    ddim = DDIMScheduler(**SD1_SCHEDULER)
    ac = ddim.alphas_cumprod.float()
    den = kext.CompVisDenoiser(_AlphasOnly(ac), quantize=False)
    ksampling = sys.modules["k_diffusion.sampling"]
    res = {
        "alphas_cumprod": ac.tolist(),
        "sigmas_table": den.sigmas.tolist(),
        "steps": {},
        "versions": versions(),
    }
    for n in (8, 10, 7, 25):
        ddim.set_timesteps(n)
        pndm = PNDMScheduler(**_pndm_cfg())
        pndm.set_timesteps(n)
        karras = ksampling.get_sigmas_karras(n, den.sigmas[0].item(), den.sigmas[-1].item(), rho=7.0)
        res["steps"][str(n)] = {
            "ddim_timesteps": ddim.timesteps.tolist(),
            "pndm_timesteps": pndm.timesteps.tolist(),
            "sigmas": den.get_sigmas(n).tolist(),
            "sigmas_karras": karras.tolist(),
        }
    save_json(res, os.path.join(REF, "schedules.json"))


def _pndm_cfg():
    cfg = {k: v for k, v in SD1_SCHEDULER.items() if k != "clip_sample"}
    return dict(cfg, skip_prk_steps=True)


class _AlphasOnly(torch.nn.Module):
    def __init__(self, alphas_cumprod):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", metavar="OUT", help="write a random full-size SD 1.5 single file (f16) and exit")
    ap.add_argument("--no-txt2img", action="store_true", help="skip the whole-pipeline images")
    args = ap.parse_args()
    if args.full_size:
        import full_size

        full_size.write(args.full_size)
        return
    import kdiff

    _, kext = kdiff.load()
    os.makedirs(REF, exist_ok=True)
    clip = make_clip(CLIP_CFG, SEEDS["clip"])
    clip4 = make_clip(CLIP4_CFG, SEEDS["clip4"])
    unet = make_unet(UNET_CFG, SEEDS["unet"])
    vae = make_vae(VAE_CFG, SEEDS["vae"])
    vae_alt = make_vae(VAE_CFG, SEEDS["vae_alt"])
    tok, tok_dir = tokenizer()

    print("writing model layouts")
    write_diffusers_dirs(unet, vae, clip, tok_dir)
    write_single_files(unet, vae, clip, vae_alt)
    d4 = os.path.join(FIX, "tiny-clip-4heads")
    shutil.rmtree(d4, ignore_errors=True)
    copy.deepcopy(clip4).half().save_pretrained(d4)
    check_diffusers_dirs(unet, vae, clip)
    validate_single_file(unet, vae, clip)

    print("writing module references")
    clip_reference(clip, tok, "clip")
    clip_reference(clip4, tok, "clip4")
    meta = {"prompts": CLIP_PROMPTS, "max_length": 77, "padding": "max_length", "versions": versions()}
    save_json(meta, os.path.join(REF, "clip.json"))
    unet_reference(unet)
    vae_res, vae_alt_res = vae_reference(vae, vae_alt)
    for name, img in (("vae decoded", vae_res["decoded"]), ("vae_alt decoded", vae_alt_res["decoded"])):
        print(f"  {name}: {image_stats(to_uint8(img))}")
    schedules_reference(kext)

    if not args.no_txt2img:
        import txt2img_ref

        txt2img_ref.run(unet, vae, clip, tok, kext, REF, versions(), image_stats)
    shutil.rmtree(tok_dir, ignore_errors=True)


def to_uint8(x):
    """[-1, 1] decoder output -> HWC uint8, as the pipelines do it."""
    x = (x[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
    return (x * 255).round().astype(np.uint8)


def image_stats(img):
    """Spread figures for a uint8 HWC image: std (0-255 scale), clipped fraction, spatial std."""
    f = img.astype(np.float64)
    return {
        "std": round(float(f.std()), 2),
        "clipped": round(float(((img == 0) | (img == 255)).mean()), 4),
        "spatial_std": round(float(f.std(axis=(0, 1)).mean()), 2),
        "mean": round(float(f.mean()), 2),
    }


if __name__ == "__main__":
    main()
