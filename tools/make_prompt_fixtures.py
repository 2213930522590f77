"""Conditioning references for the prompt language (crates/sdrs/tests/it/prompt.rs).

    /opt/venv/bin/python tools/make_prompt_fixtures.py

Re-implements, over the tiny CLIP of tests/fixtures/tiny-sd1, how AUTOMATIC1111's
`FrozenCLIPEmbedderWithCustomWords` turns a prompt into conditioning (emphasis parsing, per-segment
tokenization, 75-token chunks with the comma back-off, BREAK, "Original" emphasis with the mean
restored over the batch, empty chunks for shorter texts of a batch) and how optimizedSD blends
sub-prompts (`split_weighted_subprompts`, `Σ w_i/Σw · CLIP(sub_i)` over 77-token encodings).
Writes tests/fixtures/reference/prompt.{json,safetensors}. Deterministic."""

import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_fixtures import FIX, REF, save_json, save_st, tokenizer, versions  # noqa: E402

EOS = 49407
BOS = 49406
CHUNK = 75
COMMA_BACKTRACK = 20

# A prompt over 75 tokens whose 75th token is not a comma but a comma sits a few tokens before.
LONG = (
    "a highly detailed matte painting of a quiet harbour town at dusk with fishing boats, "
    "warm lights in the windows, gulls over the water, wet cobblestones and a lighthouse on the "
    "cliff, soft fog rolling in from the sea, painted in the style of the old masters with rich "
    "colours and fine brushwork, trending on an art site, golden hour, volumetric light and a "
    "cinematic wide angle composition, (sharp focus:1.2), [blurry], many tiny details"
)


def text_encoder(clip):
    """The tiny CLIP's last hidden state, then a fixed per-channel affine map.

    The tiny model's final layer norm has weight 1 and bias 0, so its output averages to ~0 and
    A1111's `mean_before / mean_after` would divide noise by noise; a trained CLIP's does not.
    The map (`1 + (i mod 5)/8`, `((i mod 7) − 2)/16`, exact in f32) gives it a trained-like mean;
    the Rust test applies the same map."""
    hidden = clip.config.hidden_size
    i = torch.arange(hidden)
    scale = 1 + (i % 5).float() / 8
    shift = ((i % 7).float() - 2) / 16

    def encode(ids):
        return clip(ids).last_hidden_state * scale + shift

    return encode


def parse_attention(text):
    """A1111's parse_prompt_attention, rewritten as a small scanner."""
    token_re = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
    break_re = re.compile(r"\s*\bBREAK\b\s*", re.S)
    res, round_open, square_open = [], [], []

    def scale(start, m):
        for seg in res[start:]:
            seg[1] *= m

    for m in token_re.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            scale(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(break_re.split(tok)):
                if i:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for seg in res[1:]:
        if merged[-1][1] == seg[1]:
            merged[-1][0] += seg[0]
        else:
            merged.append(seg)
    return merged


def close_chunk(tokens, mults, pad):
    tokens = [BOS] + tokens + [EOS] * (CHUNK - len(tokens)) + [EOS]
    mults = [1.0] + mults + [1.0] * (CHUNK - len(mults)) + [1.0]
    if pad != EOS:
        first = tokens.index(EOS)
        tokens = tokens[: first + 1] + [pad] * (len(tokens) - first - 1)
    return tokens, mults


def a1111_chunks(tok, text, pad, emphasis=True):
    """A1111's tokenize_line: (ids, multipliers) per 77-token chunk."""
    parsed = parse_attention(text) if emphasis else [[text, 1.0]]
    comma = tok.convert_tokens_to_ids(",</w>")
    out, tokens, mults, last_comma = [], [], [], -1
    for text_, weight in parsed:
        if text_ == "BREAK" and weight == -1:
            out.append(close_chunk(tokens, mults, pad))
            tokens, mults, last_comma = [], [], -1
            continue
        for t in tok(text_, add_special_tokens=False)["input_ids"]:
            if t == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                out.append(close_chunk(tokens[:cut], mults[:cut], pad))
                tokens, mults, last_comma = tokens[cut:], mults[cut:], -1
            if len(tokens) == CHUNK:
                out.append(close_chunk(tokens, mults, pad))
                tokens, mults, last_comma = [], [], -1
            tokens.append(t)
            mults.append(weight)
    if tokens or not out:
        out.append(close_chunk(tokens, mults, pad))
    return out


def a1111_encode_batch(clip, tok, texts, pad):
    """One A1111 `get_learned_conditioning(texts)` call: a list of [1, 77k, H] tensors."""
    per_text = [a1111_chunks(tok, t, pad) for t in texts]
    count = max(len(c) for c in per_text)
    empty = close_chunk([], [], pad)
    zs = []
    with torch.no_grad():
        for i in range(count):
            batch = [c[i] if i < len(c) else empty for c in per_text]
            ids = torch.tensor([b[0] for b in batch])
            mults = torch.tensor([b[1] for b in batch])  # float32, as torch.asarray makes it
            z = clip(ids)
            before = z.mean()
            z = z * mults.reshape(mults.shape + (1,)).expand(z.shape)
            after = z.mean()
            zs.append(z * (before / after))
    z = torch.hstack(zs)
    return [z[i : i + 1] for i in range(len(texts))], per_text


def split_weighted_subprompts(text):
    """optimizedSD's parser, as in its scripts."""
    prompts, weights = [], []
    while text:
        if ":" not in text:
            prompts.append(text)
            weights.append(1.0)
            break
        idx = text.index(":")
        prompts.append(text[:idx])
        text = text[idx + 1 :]
        idx = text.index(" ") if " " in text else len(text)
        try:
            weights.append(float(text[:idx]) if idx else 1.0)
        except ValueError:
            weights.append(1.0)
        text = text[idx + 1 :]
    return prompts, weights


def optimized_blend(clip, tok, text, pad):
    """optimizedSD: two sub-prompts or more are blended, each a plain 77-token encoding."""
    prompts, weights = split_weighted_subprompts(text)
    assert len(prompts) > 1
    total = sum(weights)
    with torch.no_grad():
        c = None
        for p, w in zip(prompts, weights):
            ids = tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            if pad != EOS:
                first = ids[0].tolist().index(EOS)
                ids[0, first + 1 :] = pad
            z = clip(ids)
            c = torch.zeros_like(z) if c is None else c
            c = torch.add(c, z, alpha=w / total)
    return c, [[p, w / total] for p, w in zip(prompts, weights)]


def auto_blend(clip, tok, subs, pad):
    """Auto's blend: each sub-prompt through A1111's encoder on its own, shorter ones extended
    with an empty chunk's encoding, then Σ w_i · z_i."""
    zs = [a1111_encode_batch(clip, tok, [t], pad)[0][0] for t, _ in subs]
    longest = max(z.shape[1] for z in zs)
    empty = a1111_encode_batch(clip, tok, [""], pad)[0][0]
    c = None
    for z, (_, w) in zip(zs, subs):
        missing = (longest - z.shape[1]) // 77
        z = torch.cat([z] + [empty] * missing, dim=1)
        c = torch.zeros_like(z) if c is None else c
        c = c + z * w
    return c


def main():
    from transformers import CLIPTextModel

    tok, _ = tokenizer()
    model = CLIPTextModel.from_pretrained(os.path.join(FIX, "tiny-sd1", "text_encoder"), dtype=torch.float32)
    clip = text_encoder(model.eval())

    cases, tensors = [], {}

    def encode_case(name, texts, syntax="a1111", pad=EOS):
        zs, chunks = a1111_encode_batch(clip, tok, texts, pad)
        for i, z in enumerate(zs):
            tensors[f"{name}.{i}"] = z.contiguous()
        cases.append(
            {"name": name, "kind": "encode", "syntax": syntax, "pad": pad, "texts": texts,
             "chunks": [[{"ids": c[0], "weights": c[1]} for c in cs] for cs in chunks]}
        )
        return chunks

    encode_case("weighted", ["a (red:1.3) cat on a [blue] mat, (masterpiece)"])
    encode_case("nested", ["a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."])
    long_chunks = encode_case("long_comma", [LONG])[0]
    first_len = long_chunks[0][0].index(EOS) - 1
    assert len(long_chunks) == 2 and first_len < CHUNK, (len(long_chunks), first_len)
    encode_case("break", ["a cat BREAK (a dog:1.2) in a hat"])
    encode_case("break_pad0", ["BREAK a cat, (a dog:1.2) in a hat"], pad=0)
    encode_case("empty", [""])
    # The two texts of "a [(red:1.5) cat:dog:0.5] on a mat" at 10 steps, encoded as one batch.
    encode_case("schedule_batch", ["a (red:1.5) cat on a mat", "a dog on a mat " + LONG])

    for name, text in [
        ("blend", "tabby cat:0.25 white duck:0.75 hybrid"),
        ("blend_negative", "a cat:-0.5 a dog:1.5 snow"),
    ]:
        z, blend = optimized_blend(clip, tok, text, EOS)
        tensors[name] = z.contiguous()
        cases.append({"name": name, "kind": "blend", "syntax": "optimized", "pad": EOS, "text": text, "blend": blend})

    # Auto: a long emphasised sub-prompt and a short one.
    subs = [(LONG, 0.5 / 1.25), ("(a dog:1.2)", 0.75 / 1.25)]
    tensors["blend_auto_long"] = auto_blend(clip, tok, subs, EOS).contiguous()
    cases.append(
        {"name": "blend_auto_long", "kind": "blend", "syntax": "auto", "pad": EOS,
         "text": LONG + ":0.5 (a dog:1.2):0.75", "blend": [[t, w] for t, w in subs]}
    )

    save_st(tensors, os.path.join(REF, "prompt.safetensors"))
    save_json({"versions": versions(), "cases": cases}, os.path.join(REF, "prompt.json"))
    print(f"wrote {len(cases)} cases, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
