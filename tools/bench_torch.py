"""sdrs against PyTorch, phase by phase, in one run on one machine.

Times what `sdrs bench` times — text encoding (prompt and negative), one UNet step with
classifier-free guidance, one VAE decode, and a whole txt2img image with Euler — with
diffusers/PyTorch on the same SD 1.5-architecture CompVis single file, runs `sdrs bench --json`
on it, and prints both with the ratio sdrs/PyTorch. Each side runs in its own process, so each
peak RSS is its own (reset per phase through /proc/self/clear_refs where Linux allows).

    python tools/bench_torch.py --model /work/full/sd15-random.safetensors --size 512 --steps 20

With `--fast`, `sdrs bench --fast` (bf16 products) runs too, and its column and ratio are added.

`tools/full_size.py` writes such a file with random weights (timings depend on shapes only).
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


def torch_phases(args):
    """The PyTorch side; runs in a child process and prints its JSON."""
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


def gib(b):
    return f"{b / 2**30:.2f} GiB" if b else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an SD 1.5-architecture CompVis .safetensors file")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sdrs", default=os.path.join(ROOT, "target", "release", "sdrs"))
    p.add_argument("--fast", action="store_true", help="also run `sdrs bench --fast`")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_only:
        torch_phases(args)
        return

    common = ["--model", args.model, "--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    def run_sdrs(*flags):
        done = subprocess.run([args.sdrs, "bench", "--json", *common, *flags], check=True, capture_output=True, text=True)
        return json.loads(done.stdout)

    sdrs = run_sdrs()
    fast = {ph["name"]: ph for ph in run_sdrs("--fast")["phases"]} if args.fast else None
    torch_run = subprocess.run([sys.executable, __file__, "--torch-only", *common], check=True, capture_output=True, text=True)
    torch = json.loads(torch_run.stdout.strip().splitlines()[-1])

    theirs = {ph["name"]: ph for ph in torch["phases"]}
    print(f"{args.model} at {args.size}², {args.steps} Euler steps, median of {args.repeats}; "
          f"threads: sdrs {sdrs['threads']}, PyTorch {torch['threads']}")
    fast_head = f" {'--fast':>9} {'ratio':>7} {'fast RSS':>10}" if fast else ""
    print(f"{'phase':<16} {'sdrs':>9} {'PyTorch':>9} {'ratio':>7}{fast_head} {'GFLOP/s':>8} {'GFLOP/s':>8} {'sdrs RSS':>10} {'torch RSS':>10}")
    print(f"{'':<16} {'':>9} {'':>9} {'':>7}{' ' * len(fast_head)} {'sdrs':>8} {'PyTorch':>8}")
    for ours in sdrs["phases"]:
        other = theirs[ours["name"]]
        flops = ours["flops"]
        rate = lambda s: f"{flops / s / 1e9:.0f}" if flops else "-"
        fast_cols = ""
        if fast:
            f = fast[ours["name"]]
            fast_cols = f" {f['seconds']:>8.2f}s {f['seconds'] / other['seconds']:>6.2f}x {gib(f['peak_rss_bytes']):>10}"
        print(f"{ours['name']:<16} {ours['seconds']:>8.2f}s {other['seconds']:>8.2f}s "
              f"{ours['seconds'] / other['seconds']:>6.2f}x{fast_cols} {rate(ours['seconds']):>8} {rate(other['seconds']):>8} "
              f"{gib(ours['peak_rss_bytes']):>10} {gib(other['peak_rss_bytes']):>10}")


if __name__ == "__main__":
    main()
