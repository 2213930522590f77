"""Whole txt2img images for the prompt language (crates/sdrs/tests/it/prompt_pipeline.rs): prompt
editing, alternation, AND, optimizedSD blends, BREAK / long prompts and a scheduled negative,
on the tiny model, with the txt2img conventions of tools/txt2img_ref.py.

    /opt/venv/bin/python tools/make_prompt_pipeline_fixtures.py

Conventions (what crates/sdrs/src/pipeline/{conditioning,denoiser}.rs reproduce):
- schedules: A1111's `get_learned_conditioning_prompt_schedules` (`[from:to:when]`, `when` < 1 a
  fraction of the steps, else a step; `[a|b]` alternates, text `k` at end-step `s` is
  `alts[(s - 1) % n]`), written out below for the single-level constructs these cases use;
- conditioning: each AND part's scheduled texts in A1111's chunks
  (make_prompt_fixtures.a1111_chunks over the plain CLIP, shorter texts extended with empty
  chunks); blends are Auto's `Σ w_i/Σw · z_i`;
- at 0-based sampling step s every model call uses the first entry with s <= end_at_step
  (A1111's `reconstruct_cond_batch`); the step counter is advanced by k-diffusion's `callback`
  after each step. Heun calls its callback between its two model calls, so it is run one step
  at a time instead (sigmas[i:i+2], the same arithmetic), and both calls of a step share the
  prompt;
- guidance in eps: `u + Σ_i w_i * cfg * (c_i - u)`; one UNet call on [uncond, parts...] when the
  contexts have equal lengths, else one call per context (A1111 without pad_cond_uncond);
- DDIM: diffusers' DDIMScheduler loop written out, eta 0, the cond of step i at timestep i.

Writes tests/fixtures/reference/prompt_pipeline.json and prompt_pipeline/*.png. Deterministic."""

import json
import os
import re
import shutil
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kdiff  # noqa: E402
from make_fixtures import FIX, REF, SD1_SCHEDULER, image_stats, save_st, tokenizer, versions  # noqa: E402
from make_prompt_fixtures import EOS, a1111_chunks, close_chunk, split_weighted_subprompts  # noqa: E402
from txt2img_ref import CFG, NEGATIVE, SCALE, STEPS  # noqa: E402

OUT = os.path.join(REF, "prompt_pipeline")
SEED = 42
FOX_BIRD = "[a tiny red fox:a small blue bird:3]"
# 3 chunks: a BREAK after 7 tokens, then ~95 tokens without emphasis (a comma back-off on the way).
LONG_BREAK = (
    "a tiny red fox in the snow BREAK a quiet harbour town at dusk with fishing boats, warm lights "
    "in the windows, gulls over the water, wet cobblestones and a lighthouse on the cliff, soft fog "
    "rolling in from the sea, painted in the style of the old masters with rich colours and fine "
    "brushwork, golden hour, volumetric light, a cinematic wide angle composition, many tiny "
    "details, a red fox sleeping under a pine tree, snow falling on the roofs"
)
# name -> (sampler, prompt, negative prompt)
CASES = {
    "edit_euler_a": ("euler_a", FOX_BIRD, NEGATIVE),
    "edit_heun": ("heun", FOX_BIRD, NEGATIVE),
    "edit_ddim": ("ddim", FOX_BIRD, NEGATIVE),
    "alternate_euler": ("euler", "[a tiny red fox|a small blue bird] in the snow", NEGATIVE),
    "and_dpmpp_2m": ("dpmpp_2m", "a tiny red fox AND snowy mountains :0.7", NEGATIVE),
    "blend_euler": ("euler", "a tiny red fox:0.7 snowy mountains:0.3", NEGATIVE),
    "break_long_euler_a": ("euler_a", LONG_BREAK, "[blurry:ugly:0.5]"),
}
CONSTRUCT = re.compile(r"\[([^\[\]]*)\]")
AND_PART = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def schedule(text, steps):
    """A1111's schedule for a prompt with at most one `[a:b:when]` or `[a|b|...]`: a list of
    (end_at_step, text)."""
    m = CONSTRUCT.search(text)
    if m is None or (":" not in m.group(1) and "|" not in m.group(1)):
        return [(steps, text)]
    head, tail = text[: m.start()], text[m.end() :]
    if "|" in m.group(1):
        alts = m.group(1).split("|")
        return [(s, head + alts[(s - 1) % len(alts)] + tail) for s in range(1, steps + 1)]
    before, after, when = m.group(1).split(":")
    v = float(when)
    end = min(steps, int(v * steps if v < 1 else v))
    out = [(end, head + before + tail)] if end >= 1 else []
    return out + [(steps, head + after + tail)]


def plan(prompt, steps):
    """[(weight, [(end, [(text, w)...])...])] per AND part; an optimizedSD prompt (Auto's rule,
    narrowed to these cases: no AND, no brackets, two sub-prompts or more) is one part."""
    if not re.search(r"\bAND\b|[\[(]", prompt):
        subs, weights = split_weighted_subprompts(prompt)
        if len(subs) > 1:
            total = sum(weights)
            scheds = [schedule(s, steps) for s in subs]
            assert all(len(s) == 1 for s in scheds), "blends here are unscheduled"
            return [(1.0, [(steps, [(s[0][1], w / total) for s, w in zip(scheds, weights)])])]
    parts = []
    for part in re.split(r"\bAND\b", prompt):
        text, weight = AND_PART.match(part).groups()
        parts.append((float(weight) if weight else 1.0, [(e, [(t, 1.0)]) for e, t in schedule(text, steps)]))
    return parts


def encode_texts(clip, tok, texts):
    """A1111's encoding of one part's scheduled texts (make_prompt_fixtures.a1111_chunks), shorter
    texts extended with empty chunks. No emphasis here, so the mean restore is the identity;
    it is skipped because the tiny CLIP's batch mean can be exactly 0 (0/0)."""
    per_text = [a1111_chunks(tok, t, EOS) for t in texts]
    assert all(w == 1.0 for cs in per_text for _, ws in cs for w in ws), "emphasis in a pipeline case"
    count = max(len(cs) for cs in per_text)
    empty = close_chunk([], [], EOS)
    return [torch.cat([clip(torch.tensor([c[0]])) for c in cs + [empty] * (count - len(cs))], dim=1) for cs in per_text]


def encode_part(clip, tok, entries):
    """One part's contexts, in schedule order; a blend is Σ w_i · z_i (Auto: each sub-prompt
    encoded as A1111 does, shorter ones extended with empty chunks)."""
    if all(len(b) == 1 and b[0][1] == 1.0 for _, b in entries):
        return encode_texts(clip, tok, [b[0][0] for _, b in entries])
    out = []
    for _, blend in entries:
        zs = encode_texts(clip, tok, [t for t, _ in blend])
        c = torch.zeros_like(zs[0])
        for z, (_, w) in zip(zs, blend):
            c = c + z * w
        out.append(c)
    return out


class Conditioning:
    """The encoded prompt parts and negative, and the sampling step the sampler is at."""

    def __init__(self, clip, tok, prompt, negative):
        self.parts = [(w, [e for e, _ in entries], encode_part(clip, tok, entries)) for w, entries in plan(prompt, STEPS)]
        [(_, uentries)] = plan(negative, STEPS)
        self.uncond = ([e for e, _ in uentries], encode_part(clip, tok, uentries))
        self.step = 0

    @staticmethod
    def at(ends, contexts, step):
        return next((c for e, c in zip(ends, contexts) if step <= e), contexts[0])

    def guided_eps(self, unet, x, t):
        contexts = [self.at(*self.uncond, self.step)] + [self.at(e, c, self.step) for _, e, c in self.parts]
        if all(c.shape == contexts[0].shape for c in contexts):
            n = len(contexts)
            eps = unet(torch.cat([x] * n), torch.cat([t] * n), encoder_hidden_states=torch.cat(contexts)).sample
            eps = list(eps.chunk(n))
        else:
            eps = [unet(x, t, encoder_hidden_states=c).sample for c in contexts]
        out = eps[0]
        for (w, _, _), e in zip(self.parts, eps[1:]):
            out = out + (e - eps[0]) * (w * CFG)
        return out


class Model(torch.nn.Module):
    """What CompVisDenoiser wraps: `apply_model(x, t)` → the guided eps at the current step."""

    def __init__(self, unet, alphas_cumprod, cond):
        super().__init__()
        self.unet, self.alphas_cumprod, self.cond = unet, alphas_cumprod, cond

    def apply_model(self, x, t):
        return self.cond.guided_eps(self.unet, x, t)


def k_sample(ks, kext, unet, ac, cond, sampler, noise, gen):
    den = kext.CompVisDenoiser(Model(unet, ac, cond), quantize=False)
    sigmas = den.get_sigmas(STEPS)
    x = noise * sigmas[0]

    def advance(d):
        cond.step = d["i"] + 1

    if sampler == "euler":
        return ks.sample_euler(den, x, sigmas, disable=True, callback=advance)
    if sampler == "euler_a":
        ns = lambda s, sn: torch.randn(x.shape, generator=gen)  # noqa: E731
        return ks.sample_euler_ancestral(den, x, sigmas, disable=True, noise_sampler=ns, callback=advance)
    if sampler == "dpmpp_2m":
        return ks.sample_dpmpp_2m(den, x, sigmas, disable=True, callback=advance)
    if sampler == "heun":
        for i in range(STEPS):
            cond.step = i
            x = ks.sample_heun(den, x, sigmas[i : i + 2], disable=True)
        return x
    raise ValueError(sampler)


def ddim_sample(unet, cond, noise):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SD1_SCHEDULER)
    sched.set_timesteps(STEPS)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        cond.step = i
        eps = cond.guided_eps(unet, x, t.reshape(1))
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x


def render(ks, kext, unet, vae, ac, cond, sampler):
    gen = torch.Generator("cpu").manual_seed(SEED)
    noise = torch.randn((1, 4, 8, 8), generator=gen)
    if sampler == "ddim":
        lat = ddim_sample(unet, cond, noise)
    else:
        lat = k_sample(ks, kext, unet, ac, cond, sampler, noise, gen)
    x = (vae.decode(lat / SCALE).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return lat, (x * 255).round().astype(np.uint8)


def load_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = os.path.join(FIX, "tiny-sd1")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae"), torch_dtype=torch.float32).eval()
    clip = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder"), dtype=torch.float32).eval()
    return unet, vae, lambda ids: clip(ids).last_hidden_state


def main():
    from diffusers import DDIMScheduler

    ks, kext = kdiff.load()
    os.makedirs(OUT, exist_ok=True)
    unet, vae, clip = load_models()
    tok, tok_dir = tokenizer()
    ac = DDIMScheduler(**SD1_SCHEDULER).alphas_cumprod.float()
    manifest, latents = [], {}
    with torch.no_grad():
        for name, (sampler, prompt, negative) in CASES.items():
            cond = Conditioning(clip, tok, prompt, negative)
            lat, img = render(ks, kext, unet, vae, ac, cond, sampler)
            latents[name] = lat.contiguous()
            Image.fromarray(img).save(os.path.join(OUT, name + ".png"))
            # How much the syntax matters: the same run with only the first text of the prompt
            # (its first part, schedule entry and sub-prompt) and of the negative.
            first = [plan(p, STEPS)[0][1][0][1][0][0] for p in (prompt, negative)]
            _, plain = render(ks, kext, unet, vae, ac, Conditioning(clip, tok, *first), sampler)
            stats = image_stats(img)
            stats["mad_vs_first_text"] = round(float(np.abs(img.astype(float) - plain).mean()), 2)
            print(f"  {name}: {stats}")
            manifest.append(
                {
                    "name": name,
                    "sampler": sampler,
                    "schedule": "normal",
                    "seed": SEED,
                    "width": 64,
                    "height": 64,
                    "steps": STEPS,
                    "cfg_scale": CFG,
                    "prompt": prompt,
                    "negative_prompt": negative,
                    "parts": [
                        {"weight": w, "schedule": [[e, b] for e, b in entries]} for w, entries in plan(prompt, STEPS)
                    ],
                    "negative_schedule": [[e, b] for e, b in plan(negative, STEPS)[0][1]],
                    "chunks": [[c.shape[1] // 77 for c in cs] for _, _, cs in cond.parts],
                    "file": f"prompt_pipeline/{name}.png",
                    "stats": stats,
                }
            )
    save_st(latents, os.path.join(REF, "prompt_pipeline_latents.safetensors"))
    with open(os.path.join(REF, "prompt_pipeline.json"), "w") as f:
        json.dump({"cases": manifest, "versions": versions()}, f, indent=1)
        f.write("\n")
    shutil.rmtree(tok_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
