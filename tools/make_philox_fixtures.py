"""References for A1111's "NV" noise source (its `modules/rng_philox.py`): torch.randn as a CUDA
device draws it, computed on the CPU with Philox4x32-10 and Box–Muller in numpy, so that
crates/sdrs/src/sampling/rng/philox.rs can be checked bit for bit, and two whole txt2img images
on the tiny SD 1 model with that noise in place of torch's CPU generator.

    /tmp/torchenv/bin/python tools/make_philox_fixtures.py      # ~5 s

The generator is re-implemented here (numpy, the same dtypes as A1111's code, so the same bits):
- `Generator(seed)`: the key is the seed as a uint64 split in two uint32 words (key[0] the low
  32 bits, key[1] the high ones); the offset starts at 0.
- `randn(shape)`: value i of the call (i < prod(shape), row-major) comes from the counter
  `[offset, 0, i, 0]`; the offset then moves on by one per call (not per value), so the k-th
  call equals torch's k-th `randn` on CUDA after `manual_seed(seed)`.
- Philox4x32, 10 rounds: v1 = u64(c0)·0xD2511F53, v2 = u64(c2)·0xCD9E8D57,
  c = [hi(v2) ^ c1 ^ k0, lo(v2), hi(v1) ^ c3 ^ k1, lo(v1)]; between rounds (9 times)
  k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32).
- Box–Muller on the first two output words (the other two are dropped):
  u = g0·f32(2.3283064e-10) + f32(2.3283064e-10)/2, v = g1·f32(2.3283064e-10·6.2831855) + that/2,
  where uint32 array × float32 array is float64 in numpy and the halves stay float32 (then
  widened); value = f32(sqrt(-2 ln u) · sin v), all in float64 until that one rounding.

Known vector: A1111's docstring (torch.manual_seed(0); torch.randn((3, 4), device="cuda")) is
met only to 2.6e-7 (about 3 float32 ulps) by A1111's own arithmetic, because 2π/2^32 rounded to
float32 is 2.8e-8 relative off; a float64 Box–Muller with exact constants meets it to 5e-9.
Both are asserted (check_known); the fixtures hold A1111's values. numpy's SIMD log/sin and the
C library's agree on every stored value (checked per value, recorded in the manifest).

Seeds: the key is the seed modulo 2^64, so a negative seed is its two's complement
(torch.manual_seed(-1) is seed 2^64 - 1, and numpy 1.x wrapped `np.array([-1], np.uint64)` the
same way; numpy 2 raises instead, so A1111 on numpy 2 fails on negative seeds, which its UI never
passes on). Seeds outside [-2^63, 2^64) are refused, as torch.manual_seed refuses them.

Writes tests/fixtures/reference/philox.{json,safetensors}, philox_latents.safetensors and
philox/*.png. Reads tests/fixtures/tiny-sd1/ (make_fixtures.py). Deterministic."""

import math
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kdiff  # noqa: E402
from make_fixtures import FIX, REF, SD1_SCHEDULER, image_stats, save_json, tokenizer, versions  # noqa: E402
import txt2img_ref  # noqa: E402
from txt2img_ref import CFG, NEGATIVE, PROMPT, SCALE, STEPS  # noqa: E402

PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
ROUNDS = 10
TWO_POW32_INV = np.array([2.3283064e-10], dtype=np.float32)
TWO_POW32_INV_2PI = np.array([2.3283064e-10 * 6.2831855], dtype=np.float32)
MASK32 = np.uint64(0xFFFFFFFF)

# torch.manual_seed(0); torch.randn((3, 4), device="cuda") (the example in A1111's docstring).
KNOWN_SEED0 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]

# name prefix -> (seed, [shape of each successive randn call]); tensor names are f"{prefix}_call{k}".
SEQUENCES = {
    "seed0": (0, [(3, 4), (2, 5)]),
    "seed42": (42, [(1, 4, 64, 64), (1, 4, 64, 64)]),
    "seed4294967297": (4294967297, [(16,)]),
    "seed123456789": (123456789, [(4, 96, 1), (1,)]),
    "seed4294967295": (4294967295, [(7,), (3, 3)]),
    # = torch.manual_seed(-1): both key words all ones.
    "seed18446744073709551615": (2**64 - 1, [(5,)]),
    # The noise of the images below: the initial latent, then one call per Euler a step.
    "latent8_seed42": (42, [(1, 4, 8, 8)] * STEPS),
}

# name -> (sampler, schedule, eta), as txt2img_ref.CASES.
IMAGE_CASES = {"euler_a": ("euler_a", "normal", 1.0), "euler": ("euler", "normal", 0.0)}
IMAGE_SEED, IMAGE_SIZE = 42, (64, 64)


class Philox:
    """A1111's NV generator: torch.randn as on a CUDA device after manual_seed(seed)."""

    def __init__(self, seed):
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed {seed} is outside [-2^63, 2^64)")
        seed %= 2**64
        self.seed = seed
        self.key = (np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32))
        self.offset = 0

    def words(self, n):
        """The four Philox output words for values 0..n of the next call, and moves the offset."""
        c = [
            np.full(n, self.offset & 0xFFFFFFFF, dtype=np.uint32),
            np.zeros(n, dtype=np.uint32),
            np.arange(n, dtype=np.uint32),
            np.zeros(n, dtype=np.uint32),
        ]
        self.offset += 1
        k0, k1 = (np.full(n, k, dtype=np.uint32) for k in self.key)
        for r in range(ROUNDS):
            v1 = c[0].astype(np.uint64) * np.uint64(PHILOX_M[0])
            v2 = c[2].astype(np.uint64) * np.uint64(PHILOX_M[1])
            hi1, lo1 = (v1 >> np.uint64(32)).astype(np.uint32), (v1 & MASK32).astype(np.uint32)
            hi2, lo2 = (v2 >> np.uint64(32)).astype(np.uint32), (v2 & MASK32).astype(np.uint32)
            c = [hi2 ^ c[1] ^ k0, lo2, hi1 ^ c[3] ^ k1, lo1]
            if r < ROUNDS - 1:
                k0 = k0 + np.uint32(PHILOX_W[0])  # uint32 arithmetic: wraps mod 2^32
                k1 = k1 + np.uint32(PHILOX_W[1])
        return c

    def randn(self, shape):
        n = int(np.prod(shape, dtype=np.int64))
        g = self.words(n)
        return box_muller(g[0], g[1]).reshape(shape)


def uniforms(x, y):
    """uint32 words -> float64 (u, v) with A1111's numpy promotion: uint32 array * float32 array
    is float64; `TWO_POW32_INV / 2` stays float32 and is widened by the addition."""
    u = x * TWO_POW32_INV + TWO_POW32_INV / 2
    v = y * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    assert u.dtype == v.dtype == np.float64 and (TWO_POW32_INV / 2).dtype == np.float32
    return u, v


def box_muller(x, y):
    u, v = uniforms(x, y)
    s = np.sqrt(-2.0 * np.log(u))
    return (s * np.sin(v)).astype(np.float32)


def box_muller_libm(x, y):
    """The same with the C library's log/sin/sqrt per value (what a Rust port calls) instead of
    numpy's SIMD loops: how many values the two disagree on is recorded in the manifest."""
    u, v = uniforms(x, y)
    return np.array([math.sqrt(-2.0 * math.log(a)) * math.sin(b) for a, b in zip(u.tolist(), v.tolist())], dtype=np.float64).astype(np.float32)


def check_known():
    """The Philox words are those of the known vector; A1111's Box–Muller is not torch's CUDA one.

    With A1111's float32 constants (2π/2^32 rounded to float32 is 2.8e-8 relative too large) its
    values differ from the docstring's CUDA values by up to 2.6e-7 (about 3 float32 ulps), so that
    check gets a 3e-7 bound; the same words through a float64 Box–Muller with the exact
    constants (u = (g0 + 0.5)·2^-32, v = (g1 + 0.5)·2π·2^-32, not rounded to float32) match the
    printed 8 decimals to 5e-9, which pins down the Philox part and the value order."""
    known = np.array(KNOWN_SEED0)
    got = Philox(0).randn((3, 4))
    assert got.dtype == np.float32 and got.shape == (3, 4)
    err = float(np.abs(got.astype(np.float64) - known).max())
    assert err < 3e-7, f"seed 0 (3,4): {got} differs from the known vector by {err}"
    g = Philox(0).words(12)
    u = (g[0].astype(np.float64) + 0.5) * 2.0**-32
    v = (g[1].astype(np.float64) + 0.5) * (2.0**-32 * 2 * math.pi)
    exact = (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).reshape(3, 4)
    err_exact = float(np.abs(exact - known).max())
    assert err_exact < 1e-8, f"seed 0 (3,4), float64 Box–Muller: {exact} differs by {err_exact}"
    # Value i depends on i and the call only; a negative seed is its two's complement.
    assert np.array_equal(Philox(0).randn((5,)), got.reshape(-1)[:5])
    assert np.array_equal(Philox(-1).randn((5,)), Philox(2**64 - 1).randn((5,)))
    return {
        "a1111_max_abs_error": float(f"{err:.3g}"),
        "exact_float64_box_muller_max_abs_error": float(f"{err_exact:.3g}"),
        "a1111_values": got.astype(np.float64).tolist(),
    }


def randn_tables():
    tensors, entries, libm_diff = {}, [], []
    for prefix, (seed, shapes) in SEQUENCES.items():
        gen, check = Philox(seed), Philox(seed)
        for k, shape in enumerate(shapes):
            name = f"{prefix}_call{k}"
            tensors[name] = gen.randn(shape)
            g = check.words(int(np.prod(shape)))
            alt = box_muller_libm(g[0], g[1])
            ndiff = int((alt.view(np.uint32) != tensors[name].reshape(-1).view(np.uint32)).sum())
            if ndiff:
                libm_diff.append({"name": name, "values": ndiff})
            entries.append({"name": name, "seed": seed, "call": k, "shape": list(shape)})
    return tensors, entries, libm_diff


def load_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = os.path.join(FIX, "tiny-sd1")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae"), torch_dtype=torch.float32).eval()
    clip = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"), dtype=torch.float32).eval()
    return unet, vae, clip


def render(ks, kext, models, ac, uncond, cond, sampler, schedule, noise, gen, randn=None):
    """txt2img_ref.run's k-diffusion path: the final latent and the uint8 image."""
    unet, vae, _ = models
    lat = txt2img_ref.k_sample(ks, kext, unet, ac, uncond, cond, sampler, schedule, noise, gen, randn=randn)
    x = vae.decode(lat / SCALE).sample
    x = (x / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return lat, (x * 255).round().astype(np.uint8)


def images(noise_tables):
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file

    models = load_models()  # before kdiff's torchvision stub, which transformers' import trips on
    ks, kext = kdiff.load()
    tok, tok_dir = tokenizer()
    ac = DDIMScheduler(**SD1_SCHEDULER).alphas_cumprod.float()
    out_dir = os.path.join(REF, "philox")
    os.makedirs(out_dir, exist_ok=True)
    w, h = IMAGE_SIZE
    shape = (1, 4, h // 8, w // 8)
    ref_latents = load_file(os.path.join(REF, "txt2img_latents.safetensors"))
    cases, latents = [], {}
    with torch.no_grad():
        uncond, cond = txt2img_ref.encode(models[2], tok, NEGATIVE), txt2img_ref.encode(models[2], tok, PROMPT)
        for name, (sampler, schedule, eta) in IMAGE_CASES.items():
            stem = f"{name}_seed{IMAGE_SEED}"
            # The plumbing with torch's CPU generator must give txt2img.json's image and latent, up
            # to the float rounding of another machine's kernels (here: 1 level at a few pixels,
            # latents within 5e-4).
            cpu = torch.Generator("cpu").manual_seed(IMAGE_SEED)
            cpu_lat, cpu_img = render(ks, kext, models, ac, uncond, cond, sampler, schedule, torch.randn(shape, generator=cpu), cpu)
            want = np.array(Image.open(os.path.join(REF, "txt2img", stem + ".png")))
            d_img = int(np.abs(cpu_img.astype(np.int64) - want).max())
            d_lat = float((cpu_lat - ref_latents[stem]).abs().max())
            assert d_img <= 1 and d_lat < 2e-3, f"{stem}: the torch-generator run differs from txt2img/{stem}.png by {d_img} levels, latent {d_lat}"

            gen = Philox(IMAGE_SEED)
            drawn = []

            def nv_randn(s, gen=gen, drawn=drawn):
                t = torch.from_numpy(gen.randn(tuple(s)))
                drawn.append(t)
                return t

            noise = nv_randn(shape)
            lat, img = render(ks, kext, models, ac, uncond, cond, sampler, schedule, noise, None, randn=nv_randn)
            # Every draw is the corresponding NV call stored in philox.safetensors.
            for k, t in enumerate(drawn):
                assert np.array_equal(t.numpy(), noise_tables[f"latent8_seed{IMAGE_SEED}_call{k}"])
            Image.fromarray(img).save(os.path.join(out_dir, stem + ".png"))
            latents[stem] = lat.contiguous()
            stats = image_stats(img)
            mad = round(float(np.abs(img.astype(np.float64) - want).mean()), 2)
            print(f"  {stem}: {len(drawn)} NV calls, {stats}, mad vs torch-CPU noise {mad}; torch-CPU rerun vs txt2img: {d_img} levels, latent {d_lat:.1e}")
            cases.append(
                {
                    "name": name,
                    "sampler": sampler,
                    "schedule": schedule,
                    "eta": eta,
                    "seed": IMAGE_SEED,
                    "width": w,
                    "height": h,
                    "steps": STEPS,
                    "cfg_scale": CFG,
                    "prompt": PROMPT,
                    "negative_prompt": NEGATIVE,
                    "file": f"philox/{stem}.png",
                    "latent_key": stem,
                    "randn_source": "NV",
                    "randn_calls": len(drawn),
                    "stats": stats,
                    "mad_vs_cpu_generator": mad,
                }
            )
    shutil.rmtree(tok_dir, ignore_errors=True)
    return cases, latents


CONVENTIONS = {
    "generator": "A1111's NV source (modules/rng_philox.py), its CPU emulation of torch.randn on a CUDA device after torch.manual_seed(seed): the values are A1111's bit for bit, CUDA's to about 3e-7 (see known_vector)",
    "seed": "key = seed mod 2^64 as two uint32 words: key[0] = low 32 bits, key[1] = high 32 bits; negative seeds are their two's complement (torch.manual_seed(-1) = seed 2^64-1; A1111 under numpy 2 raises on them instead, its UI never passes one); the offset starts at 0",
    "randn": "value i of a call (i < prod(shape), row-major) uses counter [offset, 0, i mod 2^32, 0]; the offset then increases by 1 per call, not per value",
    "philox": "Philox4x32, 10 rounds: v1 = u64(c0)*0xD2511F53, v2 = u64(c2)*0xCD9E8D57, c = [hi32(v2)^c1^k0, lo32(v2), hi32(v1)^c3^k1, lo32(v1)]; after each round but the last k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32)",
    "box_muller": "on output words g0, g1 (g2, g3 dropped): u = f64(g0)*f64(f32(2.3283064e-10)) + f64(f32(2.3283064e-10)/2), v = f64(g1)*f64(f32(2.3283064e-10*6.2831855)) + f64(that f32/2), value = f32(sqrt(-2 ln u) * sin v) computed in float64 (numpy: uint32 array * float32 array is float64, the halves stay float32)",
    "known_vector": "seed 0, shape (3,4) -> "
    + str(KNOWN_SEED0)
    + " (A1111's docstring, torch's CUDA output); A1111's float32-constant Box-Muller gives these only to 2.6e-7 (seed0_call0 holds its exact float32 values), a float64 Box-Muller with exact 2^-32 and 2*pi gives them to 5e-9: see known_vector_check",
    "tensors": "philox.safetensors: float32, one tensor per randn call, named <sequence>_call<k>, k = the call's index on a fresh generator; `randn` lists seed, call and shape",
    "images": "tools/txt2img_ref.py's k-diffusion path (CompVisDenoiser, quantize=False, get_sigmas(steps), x = noise * sigmas[0], CFG on eps from one UNet call on [uncond, cond], vae.decode(latent / 0.18215), round half to even) with the NV generator of the seed: initial noise = call 0 of shape (1,4,H/8,W/8), each Euler a step's noise = the next call (calls 1..7 for 8 steps; the last step draws none); Euler draws only call 0. These calls are latent8_seed42_call*; final latents in philox_latents.safetensors under latent_key",
}


def main():
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file as save_torch

    known = check_known()
    print(f"known vector: {known}")
    tensors, entries, libm_diff = randn_tables()
    total = sum(t.size for t in tensors.values())
    assert total >= 10_000
    print(f"{len(tensors)} randn calls, {total} values; numpy vs libm log/sin: {libm_diff or 'bit-equal'}")
    save_np(tensors, os.path.join(REF, "philox.safetensors"))
    cases, latents = images(tensors)
    save_torch(latents, os.path.join(REF, "philox_latents.safetensors"))
    doc = {
        "conventions": CONVENTIONS,
        "randn": entries,
        "randn_values": int(total),
        "known_vector_check": known,
        "libm_vs_numpy_differences": libm_diff,
        "cases": cases,
        "versions": dict(versions(), numpy=np.__version__),
    }
    save_json(doc, os.path.join(REF, "philox.json"))


if __name__ == "__main__":
    main()
