"""A random rank-32 kohya LoRA (LoCon) over every attention, feed-forward, projection and
convolution layer of a full-size SD 1.5 single file and every text-encoder layer, for timing
`sdrs bench --lora`: what it costs to merge and remove depends on shapes only.

    python tools/full_size_lora.py MODEL.safetensors OUT.safetensors [--rank 32]
"""

import argparse

import torch
from safetensors import safe_open
from safetensors.torch import save_file

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    r = args.rank
    out = {}
    with safe_open(args.model, "pt") as f:
        for key in f.keys():
            if not key.endswith(".weight"):
                continue
            if key.startswith(UNET):
                name = "lora_unet_" + key[len(UNET):-len(".weight")].replace(".", "_")
            elif key.startswith(TE) and ".encoder.layers." in "." + key[len(TE):]:
                name = "lora_te_text_model_" + key[len(TE):-len(".weight")].replace(".", "_")
            else:
                continue
            shape = f.get_slice(key).get_shape()
            if len(shape) not in (2, 4) or "norm" in key:
                continue
            out_dim, in_dim = shape[0], shape[1]
            kernel = shape[2:] if len(shape) == 4 else []
            down = torch.randn([r, in_dim, *kernel], generator=gen) * 0.01
            up = torch.randn([out_dim, r, *([1, 1] if kernel else [])], generator=gen) * 0.01
            out[f"{name}.lora_down.weight"] = down.half()
            out[f"{name}.lora_up.weight"] = up.half()
            out[f"{name}.alpha"] = torch.tensor(float(r)).half()
    save_file(out, args.out)
    layers = len(out) // 3
    size = sum(t.numel() * t.element_size() for t in out.values())
    print(f"{args.out}: {layers} layers, rank {r}, {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
