"""sdrs against PyTorch, phase by phase, in one run on one machine.

Times what `sdrs bench` times — text encoding (prompt and negative), one UNet step with
classifier-free guidance, one VAE decode, and a whole txt2img image with Euler — with
diffusers/PyTorch on the same SD 1.5-architecture CompVis single file, runs `sdrs bench --json`
on it, and prints both with the ratio sdrs/PyTorch. Each side runs in its own process, so each
peak RSS is its own (reset per phase through /proc/self/clear_refs where Linux allows).

    python tools/bench_torch.py --model /work/full/sd15-random.safetensors --size 512 --steps 20

With `--fast`, `sdrs bench --fast` (bf16 products) runs too, and its column and ratio are added.

`tools/full_size.py` writes such a file with random weights (timings depend on shapes only).

An SGM single file (SDXL: `conditioner.embedders.1.model.*` keys; `tools/full_size.py --sdxl`)
is measured as SDXL base 1.0: both text encoders (prompt and negative; penultimate states and
the pooled projection), the UNet on a batch of 2 with `added_cond_kwargs` (pooled text and the
size ids), the VAE at 0.13025, and the whole image through `StableDiffusionXLPipeline` built
from those modules (SDXL base's Euler scheduler config; no tokenizers, no internet). Each
network is read from the file alone and turned into f32 tensor by tensor, so the f16 file and
the f32 model are never both in memory.

    python tools/bench_torch.py --model /tmp/sdxl-random.safetensors --size 1024 --steps 1 --repeats 1 --fast

`--save-json FILE` keeps both sides' raw results and the load averages before each side.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PROMPT_TOKENS = 77
CFG_SCALE = 7.5


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


SGM_TE2 = "conditioner.embedders.1.model."


def is_sdxl(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return any(k.startswith(SGM_TE2) for k in f.keys())


def torch_phases(args):
    """The PyTorch side; runs in a child process and prints its JSON."""
    if is_sdxl(args.model):
        return torch_phases_sdxl(args)
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, HERE)
    from full_size import CLIP, UNET, VAE

    phases = []
    per_phase = reset_peak()
    start = time.perf_counter()
    state = load_file(args.model)
    unet = UNet2DConditionModel(**UNET)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, UNET))
    vae = AutoencoderKL(**VAE)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, VAE))
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP))
    clip_state = sfu.convert_ldm_clip_checkpoint(state)
    text_encoder.load_state_dict(clip_state, strict=False)
    del state, clip_state
    for m in (unet, vae, text_encoder):
        m.to(torch.float32).eval()
    phases.append({"name": "load", "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss()})

    def measure(name, repeats, fn):
        reset_peak()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        phases.append({"name": name, "seconds": statistics.median(times), "peak_rss_bytes": peak_rss()})

    # Token ids do not change the work: BOS, some words, EOS, EOS padding.
    ids = torch.full((1, PROMPT_TOKENS), 49407, dtype=torch.long)
    ids[0, :12] = torch.tensor([49406] + list(range(320, 330)) + [49407])

    def encode():
        return text_encoder(ids)[0], text_encoder(ids)[0]

    side = args.size // 8
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((1, 4, side, side), generator=generator)
    with torch.no_grad():
        measure("text encode", args.repeats, encode)
        cond, uncond = encode()
        context = torch.cat([uncond, cond])

        def step():
            eps = unet(torch.cat([x, x]), 500, encoder_hidden_states=context).sample
            e_u, e_c = eps.chunk(2)
            return e_u + CFG_SCALE * (e_c - e_u)

        measure("UNet step (CFG)", args.repeats, step)
        measure("VAE decode", args.repeats, lambda: vae.decode(x / 0.18215).sample)

        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=None,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)

        def image():
            c, u = encode()
            pipe(
                prompt_embeds=c,
                negative_prompt_embeds=u,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=CFG_SCALE,
                generator=torch.Generator().manual_seed(1),
            )

        measure("whole image", 1, image)
    print(json.dumps({"threads": torch.get_num_threads(), "per_phase_peaks": per_phase, "phases": phases}))


def read_prefix(path, prefix):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def on_meta(cls, *args, **kwargs):
    import torch

    with torch.device("meta"):
        return cls(*args, **kwargs)


def load_f32(model, state):
    """Loads `state` (emptied on the way, one tensor at a time to f32) into a meta-device model.
    Names are matched with or without `text_model.` (transformers 5's CLIPTextModel has none,
    CLIPTextModelWithProjection has it)."""
    import torch

    names = set(model.state_dict())
    for k in list(state):
        v = state.pop(k).to(torch.float32)
        if k not in names:
            k = next((n for n in (k.removeprefix("text_model."), "text_model." + k) if n in names), k)
        state[k] = v
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected, f"unexpected keys {unexpected[:5]}"
    state.clear()
    for name, buf in model.named_buffers():
        if buf.is_meta and name.endswith("position_ids"):  # CLIP's non-persistent buffer
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            parent.position_ids = torch.arange(buf.shape[-1]).expand((1, -1))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"not loaded: {left[:5]} (missing {missing[:5]})"
    return model.eval()


def torch_phases_sdxl(args):
    """The SDXL side of `torch_phases`."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, HERE)
    from full_size import SDXL_TE1, SDXL_TE2, SDXL_UNET, SDXL_VAE
    from make_sdxl_fixtures import SCHEDULER, TE1_PREFIX, TE2_PREFIX, UNET_PREFIX, VAE_PREFIX

    phases = []
    per_phase = reset_peak()
    start = time.perf_counter()
    # One network at a time; the f16 tensors go as their f32 copies are made.
    def load(prefix, model, convert):
        state = read_prefix(args.model, prefix)
        converted = convert(model, state)
        state.clear()
        return load_f32(model, converted)

    unet = load(UNET_PREFIX, on_meta(UNet2DConditionModel, **SDXL_UNET),
                lambda m, st: sfu.convert_ldm_unet_checkpoint(st, SDXL_UNET))
    text_encoder_2 = load(TE2_PREFIX, on_meta(CLIPTextModelWithProjection, CLIPTextConfig(**SDXL_TE2)),
                          lambda m, st: sfu.convert_open_clip_checkpoint(m, st, prefix=TE2_PREFIX))
    text_encoder = load(TE1_PREFIX, on_meta(CLIPTextModel, CLIPTextConfig(**SDXL_TE1)),
                        lambda m, st: sfu.convert_ldm_clip_checkpoint(st, remove_prefix=TE1_PREFIX))
    vae = load(VAE_PREFIX, on_meta(AutoencoderKL, **SDXL_VAE), lambda m, st: sfu.convert_ldm_vae_checkpoint(st, SDXL_VAE))
    phases.append({"name": "load", "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss()})

    def measure(name, repeats, fn):
        reset_peak()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        phases.append({"name": name, "seconds": statistics.median(times), "peak_rss_bytes": peak_rss()})

    # Token ids do not change the work: BOS, some words, EOS, then each tokenizer's padding.
    ids1 = torch.full((1, PROMPT_TOKENS), 49407, dtype=torch.long)
    ids1[0, :12] = torch.tensor([49406] + list(range(320, 330)) + [49407])
    ids2 = ids1.clone()
    ids2[0, 12:] = 0  # tokenizer_2 pads with "!"

    def encode_one():
        h1 = text_encoder(ids1, output_hidden_states=True).hidden_states[-2]
        out2 = text_encoder_2(ids2, output_hidden_states=True)
        return torch.cat([h1, out2.hidden_states[-2]], -1), out2.text_embeds

    def encode():
        return encode_one(), encode_one()

    side = args.size // 8
    generator = torch.Generator().manual_seed(1)
    x = torch.randn((1, 4, side, side), generator=generator)
    time_ids = torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]], dtype=torch.float32)
    with torch.no_grad():
        measure("text encode", args.repeats, encode)
        (cond, pooled), (uncond, neg_pooled) = encode()
        for name, t in (("context", cond), ("pooled", pooled)):
            assert torch.isfinite(t).all(), f"text encode: {name} not finite"
        context = torch.cat([uncond, cond])
        added = {"text_embeds": torch.cat([neg_pooled, pooled]), "time_ids": time_ids.repeat(2, 1)}

        def step():
            eps = unet(torch.cat([x, x]), 500, encoder_hidden_states=context, added_cond_kwargs=added).sample
            e_u, e_c = eps.chunk(2)
            return e_u + CFG_SCALE * (e_c - e_u)

        measure("UNet step (CFG)", args.repeats, step)
        if args.check_finite:
            assert torch.isfinite(step()).all(), "UNet step not finite"
        scale = SDXL_VAE["scaling_factor"]
        measure("VAE decode", args.repeats, lambda: vae.decode(x / scale).sample)

        scheduler = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items()
                                              if k not in ("clip_sample", "set_alpha_to_one", "skip_prk_steps", "sample_max_value")})
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)

        def image():
            (c, p), (u, n) = encode()
            pipe(
                prompt_embeds=c,
                pooled_prompt_embeds=p,
                negative_prompt_embeds=u,
                negative_pooled_prompt_embeds=n,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                guidance_scale=CFG_SCALE,
                generator=torch.Generator().manual_seed(1),
            )

        measure("whole image", 1, image)
    print(json.dumps({"threads": torch.get_num_threads(), "per_phase_peaks": per_phase, "phases": phases}))


def gib(b):
    return f"{b / 2**30:.2f} GiB" if b else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an SD 1.5-architecture CompVis or an SDXL SGM .safetensors file")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sdrs", default=os.path.join(ROOT, "target", "release", "sdrs"))
    p.add_argument("--fast", action="store_true", help="also run `sdrs bench --fast`")
    p.add_argument("--save-json", metavar="FILE", help="write both sides' raw results to FILE")
    p.add_argument("--check-finite", action="store_true", help="SDXL: one more UNet step, asserted finite")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_only:
        torch_phases(args)
        return

    common = ["--model", args.model, "--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    def run_sdrs(*flags):
        done = subprocess.run([args.sdrs, "bench", "--json", *common, *flags], check=True, capture_output=True, text=True)
        return json.loads(done.stdout)

    loads = {}  # 1, 5 and 15 minute load averages before each side
    loads["sdrs"] = os.getloadavg()
    sdrs = run_sdrs()
    loads["sdrs --fast"] = os.getloadavg()
    run_fast = run_sdrs("--fast") if args.fast else None
    loads["PyTorch"] = os.getloadavg()
    fast = {ph["name"]: ph for ph in run_fast["phases"]} if args.fast else None
    extra = ["--check-finite"] if args.check_finite else []
    torch_run = subprocess.run([sys.executable, __file__, "--torch-only", *common, *extra], check=True, capture_output=True, text=True)
    torch = json.loads(torch_run.stdout.strip().splitlines()[-1])

    if args.save_json:
        with open(args.save_json, "w") as f:
            json.dump({"load_averages": loads, "sdrs": sdrs, "sdrs_fast": run_fast, "torch": torch}, f, indent=1)
    theirs = {ph["name"]: ph for ph in torch["phases"]}
    print(f"{args.model} at {args.size}², {args.steps} Euler steps, median of {args.repeats}; "
          f"threads: sdrs {sdrs['threads']}, PyTorch {torch['threads']}")
    fast_head = f" {'--fast':>9} {'ratio':>7} {'GFLOP/s':>8} {'fast RSS':>10}" if fast else ""
    print(f"{'phase':<16} {'sdrs':>9} {'PyTorch':>9} {'ratio':>7}{fast_head} {'GFLOP/s':>8} {'GFLOP/s':>8} {'sdrs RSS':>10} {'torch RSS':>10}")
    print(f"{'':<16} {'':>9} {'':>9} {'':>7}{' ' * len(fast_head)} {'sdrs':>8} {'PyTorch':>8}")
    for ours in sdrs["phases"]:
        other = theirs[ours["name"]]
        flops = ours["flops"]
        rate = lambda s: f"{flops / s / 1e9:.0f}" if flops else "-"
        fast_cols = ""
        if fast:
            f = fast[ours["name"]]
            fast_cols = (f" {f['seconds']:>8.2f}s {f['seconds'] / other['seconds']:>6.2f}x {rate(f['seconds']):>8}"
                         f" {gib(f['peak_rss_bytes']):>10}")
        print(f"{ours['name']:<16} {ours['seconds']:>8.2f}s {other['seconds']:>8.2f}s "
              f"{ours['seconds'] / other['seconds']:>6.2f}x{fast_cols} {rate(ours['seconds']):>8} {rate(other['seconds']):>8} "
              f"{gib(ours['peak_rss_bytes']):>10} {gib(other['peak_rss_bytes']):>10}")
    print("load averages before each side: " + ", ".join(
        f"{k} {' '.join(f'{x:.2f}' for x in v)}" for k, v in loads.items() if k != "sdrs --fast" or fast))
    peaks = [ph["peak_rss_bytes"] for ph in torch["phases"] if ph["peak_rss_bytes"]]
    if peaks:  # the phases follow each other, so their largest peak is the process's (to what runs between them)
        print(f"PyTorch peak RSS over all phases: {gib(max(peaks))}")


if __name__ == "__main__":
    main()
