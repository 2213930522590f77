"""Writes tests/fixtures/rng/randn.safetensors: torch.randn outputs (CPU generator, float32)
for several seeds and sizes, in both of torch's math variants, so the Rust TorchGenerator can be
checked bit for bit.

torch picks its normal kernel by CPU capability: "default" runs scalar libm log/cos/sin, "avx2"
(and "avx512", which reuses the avx2 kernel for normal_) runs avx_mathfun's Cephes polynomials.
The capability is fixed when torch loads, so each variant is produced in a child process with
ATEN_CPU_CAPABILITY set.

Usage: /opt/venv/bin/python tools/rng_reference.py
"""

import json
import os
import subprocess
import sys

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "rng", "randn.safetensors")

SEEDS = [0, 1, 42, 2**32 + 5, 4294967295]
SIZES = [1, 5, 15, 16, 17, 31, 256]
# One SD latent (4 x 64 x 64) for two seeds only: it is 64 KiB per variant and seed.
LATENT_SEEDS = [0, 42]
LATENT_SHAPE = [1, 4, 64, 64]
# Samplers draw repeatedly from one generator; the n < 16 path caches a value across calls.
MIXED = [5, 17, [1, 4, 8, 8], 3, 1, 16, 2, 15, 33]
MIXED_SEEDS = [0, 42]
VARIANTS = {"scalar": "default", "avx2": "avx2"}


def draw(capability):
    """Runs in the child: returns {name: list of float32 bit patterns}."""
    import torch

    got = torch.backends.cpu.get_cpu_capability().lower()
    if capability != "native" and got != capability:
        raise SystemExit(f"asked for capability {capability}, torch runs {got}")
    out = {}

    def put(name, t):
        out[name] = t.contiguous().view(-1).numpy().view(np.uint32).tolist()

    for seed in SEEDS:
        for n in SIZES:
            g = torch.Generator().manual_seed(seed)
            put(f"seed{seed}/n{n}", torch.randn(n, generator=g))
    for seed in LATENT_SEEDS:
        g = torch.Generator().manual_seed(seed)
        put(f"seed{seed}/latent", torch.randn(LATENT_SHAPE, generator=g))
    for seed in MIXED_SEEDS:
        g = torch.Generator().manual_seed(seed)
        for i, shape in enumerate(MIXED):
            put(f"seed{seed}/mixed{i}", torch.randn(shape, generator=g))
    return out


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        json.dump(draw(sys.argv[2]), sys.stdout)
        return

    from safetensors.numpy import save_file

    tensors = {}
    for variant, capability in VARIANTS.items():
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        res = subprocess.run([sys.executable, __file__, "--child", capability], env=env, check=True, capture_output=True, text=True)
        for name, bits in json.loads(res.stdout).items():
            tensors[f"{variant}/{name}"] = np.array(bits, dtype=np.uint32).view(np.float32)

    # Record which variant an unconstrained torch uses on this machine.
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    native = subprocess.run([sys.executable, "-c", probe], env=env, check=True, capture_output=True, text=True).stdout.strip()
    res = subprocess.run([sys.executable, __file__, "--child", "native"], env=env, check=True, capture_output=True, text=True)
    native_bits = json.loads(res.stdout)
    native_matches = [v for v in VARIANTS if all(np.array_equal(np.array(b, dtype=np.uint32), tensors[f"{v}/{k}"].view(np.uint32)) for k, b in native_bits.items())]
    native = f"{native} (same bits as: {', '.join(native_matches) or 'neither'})"

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    meta = {
        "seeds": json.dumps(SEEDS),
        "sizes": json.dumps(SIZES),
        "latent_seeds": json.dumps(LATENT_SEEDS),
        "latent_shape": json.dumps(LATENT_SHAPE),
        "mixed": json.dumps(MIXED),
        "mixed_seeds": json.dumps(MIXED_SEEDS),
        "native_capability": native,
    }
    save_file(tensors, OUT, metadata=meta)
    n = sum(t.size for t in tensors.values())
    differ = sum(int((tensors[k] != tensors["avx2/" + k[len("scalar/") :]]).sum()) for k in tensors if k.startswith("scalar/"))
    print(f"wrote {len(tensors)} tensors, {n} values, to {OUT}; native capability {native}; scalar and avx2 differ in {differ} values")


if __name__ == "__main__":
    main()
