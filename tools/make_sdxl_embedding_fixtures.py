"""An SDXL textual-inversion embedding in A1111's SDXL layout for the tiny SDXL, and a DDIM
reference image made with diffusers' documented SDXL loading of it.

    /tmp/torchenv/bin/python tools/make_sdxl_embedding_fixtures.py      # ~10 s on 1 core

Reads tests/fixtures/tiny-sdxl/ (written by make_sdxl_fixtures.py, not rewritten here) and writes
- tests/fixtures/embeddings-sdxl/sdrsxlfox.safetensors: A1111's SDXL embedding file, exactly two
  f32 tensors, "clip_l" [2, 4] (text encoder 1, CLIP ViT-L-like, hidden 4) and "clip_g" [2, 8]
  (text encoder 2, OpenCLIP bigG-like, hidden 8): two vectors, no metadata;
- tests/fixtures/reference/embeddings_sdxl/ddim_seed42.png: make_sdxl_fixtures' "ddim" case
  (StableDiffusionXLPipeline, DDIMScheduler.from_config(SCHEDULER), 64x64, 8 steps, guidance 5,
  latents = randn((1, 4, 8, 8)) of Generator("cpu").manual_seed(42)) with the prompt
  "a tiny sdrsxlfox in the snow", negative "blurry", after
      pipe.load_textual_inversion(state["clip_g"], token="sdrsxlfox", text_encoder=pipe.text_encoder_2,
                                  tokenizer=pipe.tokenizer_2)
      pipe.load_textual_inversion(state["clip_l"], token="sdrsxlfox", text_encoder=pipe.text_encoder,
                                  tokenizer=pipe.tokenizer)
  (diffusers' documented way for SDXL);
- tests/fixtures/reference/embeddings_sdxl.safetensors: "prompt_embeds" [1, 77, 12] and
  "pooled_prompt_embeds" [1, 6] of that prompt as pipe.encode_prompt gives them (f32);
- tests/fixtures/reference/embeddings_sdxl.json: the case, how it was made, the checks' figures.

The name "sdrsxlfox" is no CLIP vocabulary word: BPE spells it as several tokens (s, dr, sx, l,
fox</w>), so diffusers (an added token matched on the text; a multi-vector name is rewritten to
"sdrsxlfox sdrsxlfox_1" by maybe_convert_prompt, one added token per vector) and A1111 (the
name's CLIP ids matched in the prompt's ids and replaced by the vectors) put the two vectors at
the same positions; the script checks that for both tokenizers (EOS padding for tokenizer 1,
"!" for tokenizer 2). It also checks that the pipeline without the embedding reproduces
sdxl/ddim_seed42.png from make_sdxl_fixtures' prompt, and records how far the image and the
conditioning move when the embedding is not loaded. Deterministic; reruns are byte-identical."""

import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_sdxl_fixtures as xl  # noqa: E402
from make_fixtures import FIX, REF, image_stats, save_json, versions  # noqa: E402

EMB_DIR = os.path.join(FIX, "embeddings-sdxl")
NAME = "sdrsxlfox"
EMB_FILE = os.path.join(EMB_DIR, f"{NAME}.safetensors")
OUT = os.path.join(REF, "embeddings_sdxl")
IMAGE = "embeddings_sdxl/ddim_seed42.png"
TENSORS = os.path.join(REF, "embeddings_sdxl.safetensors")
MANIFEST = os.path.join(REF, "embeddings_sdxl.json")

VECTORS = 2
WIDTHS = {"clip_l": xl.TE1_CFG["hidden_size"], "clip_g": xl.TE2_CFG["hidden_size"]}  # 4, 8
# The token tables' values have std 0.02 (CLIP's init); the vectors are drawn at EMB_STD, 2.5
# times that (a trained embedding's vectors are typically somewhat larger than a word's too).
# The tiny model's image depends little on the prompt (another prompt moves it by 3.5-7.7 levels
# on average), so of the generator seeds tried (77, 1, 2, 3: 2.3, 2.6, 6.0, 2.2 levels at this
# scale) the one that moves the image most is used.
EMB_SEED = 2
EMB_STD = 0.05

PROMPT = f"a tiny {NAME} in the snow"
NEGATIVE = xl.NEGATIVE  # "blurry"
SEED = 42
BASE_CASE = "ddim"  # the sdxl.json case this one repeats with the embedding


def make_embedding():
    """{"clip_l": [2, 4], "clip_g": [2, 8]} f32, each value exact in f16 and bf16 too."""
    gen = torch.Generator().manual_seed(EMB_SEED)
    state = {}
    for key in ("clip_l", "clip_g"):
        v = torch.randn((VECTORS, WIDTHS[key]), generator=gen) * EMB_STD
        state[key] = v.bfloat16().float().contiguous()
    return state


def check_name(tok):
    """The name is several BPE tokens, none of them the whole word, so only an added token
    (diffusers) or a match on its id sequence (A1111) can find it."""
    pieces = tok.tokenize(NAME)
    assert len(pieces) > 1 and all(p.removesuffix("</w>") != NAME for p in pieces), pieces
    assert NAME not in tok.get_vocab() and f"{NAME}</w>" not in tok.get_vocab()
    return pieces, tok(NAME, add_special_tokens=False).input_ids


def a1111_ids(tok, ids, name_ids, added_ids):
    """What A1111 feeds the encoder: the prompt's plain CLIP ids `ids` (tokenized before any token
    was added) with the name's id run replaced by one slot per vector (here: the added ids, as
    stand-ins for the vectors), BOS, EOS, and the tokenizer's padding after the first EOS, 77 in all."""
    n = len(name_ids)
    hits = [i for i in range(len(ids) - n + 1) if ids[i:i + n] == name_ids]
    assert len(hits) == 1, hits
    i = hits[0]
    ids = [tok.bos_token_id] + ids[:i] + added_ids + ids[i + n:] + [tok.eos_token_id]
    return ids + [tok.pad_token_id] * (77 - len(ids))


def diffusers_ids(pipe, tok):
    text = pipe.maybe_convert_prompt(PROMPT, tok)
    return text, tok(text, padding="max_length", max_length=77, truncation=True).input_ids


def pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    f = xl.FOLDER
    te1 = CLIPTextModel.from_pretrained(os.path.join(f, "text_encoder"), dtype=torch.float32).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(os.path.join(f, "text_encoder_2"), dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(f, "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(f, "vae"), torch_dtype=torch.float32).eval()
    tok, tok2, tok_dir = xl.tokenizers()
    pipe = xl.xl_pipeline((te1, te2, unet, vae, tok, tok2), DDIMScheduler.from_config(xl.SCHEDULER))
    return pipe, tok_dir


def image(pipe, prompt):
    """make_sdxl_fixtures.run_pipeline for any prompt: DDIM, seed 42, 64x64, 8 steps, cfg 5."""
    gen = torch.Generator("cpu").manual_seed(SEED)
    noise = torch.randn((1, 4, xl.SIZE // 8, xl.SIZE // 8), generator=gen)
    with torch.no_grad():
        img = pipe(prompt, negative_prompt=NEGATIVE, height=xl.SIZE, width=xl.SIZE, num_inference_steps=xl.STEPS,
                   guidance_scale=xl.CFG, eta=0.0, generator=gen, latents=noise, output_type="np").images[0]
    return (img * 255).round().astype(np.uint8)


def encode(pipe):
    with torch.no_grad():
        pe, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return pe.contiguous(), pooled.contiguous()


def mistakes(pipe, img, pe, placement):
    """How far the image moves with the two vectors in reverse order (both encoders), and with the
    pooled output taken at the last vector's position (the argmax of diffusers' ids, which the
    added ids 49408/49409 win) instead of at the first EOS."""
    out = {}
    tables = [pipe.text_encoder.get_input_embeddings().weight, pipe.text_encoder_2.get_input_embeddings().weight]
    added = [placement[k]["added_token_ids"] for k in ("clip_l", "clip_g")]
    saved = [t[a].clone() for t, a in zip(tables, added)]
    with torch.no_grad():
        for t, a, v in zip(tables, added, saved):
            t[a] = v.flip(0)
    out["vectors_reversed"] = image(pipe, PROMPT)
    with torch.no_grad():
        for t, a, v in zip(tables, added, saved):
            t[a] = v
        te2, tok2 = pipe.text_encoder_2, pipe.tokenizer_2
        ids = torch.tensor([diffusers_ids(pipe, tok2)[1]])
        hidden = te2(ids).last_hidden_state
        at = int(ids[0].argmax())
        assert at == placement["clip_g"]["positions"][-1]
        pooled = te2.text_projection(hidden[:, at])
        gen = torch.Generator("cpu").manual_seed(SEED)
        noise = torch.randn((1, 4, xl.SIZE // 8, xl.SIZE // 8), generator=gen)
        wrong = pipe(prompt_embeds=pe, pooled_prompt_embeds=pooled, negative_prompt=NEGATIVE, height=xl.SIZE,
                     width=xl.SIZE, num_inference_steps=xl.STEPS, guidance_scale=xl.CFG, eta=0.0, generator=gen,
                     latents=noise, output_type="np").images[0]
        out["pooled_at_ids_argmax"] = (wrong * 255).round().astype(np.uint8)
    for k, v in out.items():
        out[k] = {"mad": mad(img, v), "max_abs_diff": int(np.abs(img.astype(np.int64) - v.astype(np.int64)).max())}
    return out


def mad(a, b):
    return round(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean()), 3)


def main():
    torch.set_num_threads(1)
    os.makedirs(EMB_DIR, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    save_file(make_embedding(), EMB_FILE)
    state = load_file(EMB_FILE)
    assert sorted(state) == ["clip_g", "clip_l"]
    assert all(state[k].shape == (VECTORS, WIDTHS[k]) and state[k].dtype == torch.float32 for k in state)

    pipe, tok_dir = pipeline()
    pieces, name_ids = check_name(pipe.tokenizer)
    assert check_name(pipe.tokenizer_2)[1] == name_ids

    # Without the embedding: the base case itself, then this prompt (the name as plain BPE pieces).
    base = image(pipe, xl.PROMPTS[0])
    committed = np.array(Image.open(os.path.join(REF, f"sdxl/{BASE_CASE}_seed{SEED}.png")).convert("RGB"))
    base_diff = int(np.abs(base.astype(np.int64) - committed.astype(np.int64)).max())
    assert base_diff <= 1, f"the pipeline without the embedding is {base_diff} levels off sdxl/ddim_seed42.png"
    plain = image(pipe, PROMPT)
    plain_ids = {k: t(PROMPT, add_special_tokens=False).input_ids
                 for k, t in (("clip_l", pipe.tokenizer), ("clip_g", pipe.tokenizer_2))}
    plain_pe, plain_pooled = encode(pipe)

    # diffusers' documented SDXL loading of an A1111 SDXL embedding.
    pipe.load_textual_inversion(state["clip_g"], token=NAME, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(state["clip_l"], token=NAME, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)

    placement = {}
    for key, tok, te in (("clip_l", pipe.tokenizer, pipe.text_encoder), ("clip_g", pipe.tokenizer_2,
                                                                           pipe.text_encoder_2)):
        added = [tok.convert_tokens_to_ids(t) for t in [NAME] + [f"{NAME}_{i}" for i in range(1, VECTORS)]]
        text, ids = diffusers_ids(pipe, tok)
        assert ids == a1111_ids(tok, plain_ids[key], name_ids, added), (key, ids)
        pos = [ids.index(a) for a in added]
        table = te.get_input_embeddings().weight
        assert torch.equal(table[added], state[key]), key
        placement[key] = {"converted_prompt": text, "positions": pos, "added_token_ids": added,
                          "pad_token_id": tok.pad_token_id, "first_eos": ids.index(tok.eos_token_id),
                          "input_ids": ids[:ids.index(tok.eos_token_id) + 2]}

    pe, pooled = encode(pipe)
    img = image(pipe, PROMPT)
    Image.fromarray(img).save(os.path.join(REF, IMAGE))
    if_wrong = mistakes(pipe, img, pe, placement)
    save_file({"prompt_embeds": pe, "pooled_prompt_embeds": pooled}, TENSORS)

    # Which conditioning positions the embedding moves: the causal encoders leave the ones before it.
    moved = (pe - plain_pe).abs().amax(-1)[0]
    first_moved = int(torch.nonzero(moved).min())
    pos = placement["clip_l"]["positions"]
    assert first_moved == pos[0] and placement["clip_g"]["positions"] == pos == [3, 4]  # as placement_note says
    changed = {
        "mad_vs_without_embedding": mad(img, plain),
        "max_abs_diff_vs_without_embedding": int(np.abs(img.astype(np.int64) - plain.astype(np.int64)).max()),
        "note": "the same prompt, seed and pipeline before load_textual_inversion: diffusers then tokenizes "
                f"{NAME!r} as its BPE pieces {pieces} ({len(pieces)} tokens, so every later position shifts by "
                f"{len(pieces) - VECTORS})",
        "pooled_prompt_embeds_max_abs_diff": round(float((pooled - plain_pooled).abs().max()), 5),
        "prompt_embeds_first_changed_position": first_moved,
    }
    assert changed["mad_vs_without_embedding"] > 4, changed
    assert changed["pooled_prompt_embeds_max_abs_diff"] > 1e-3, changed
    print(f"  {IMAGE}: {image_stats(img)}; without the embedding: mean |diff| {changed['mad_vs_without_embedding']}, "
          f"max {changed['max_abs_diff_vs_without_embedding']}; "
          f"pooled moves {changed['pooled_prompt_embeds_max_abs_diff']}; if wrong: {if_wrong}")

    case = {
        "name": "ddim",
        "model": "tiny-sdxl",
        "file": IMAGE,
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "width": xl.SIZE,
        "height": xl.SIZE,
        "steps": xl.STEPS,
        "cfg_scale": xl.CFG,
        "sampler": "ddim",
        "schedule": "normal",
        "eta": 0.0,
        "seed": SEED,
        "add_time_ids": xl.ADD_TIME_IDS,
        "embedding": {"name": NAME, "file": "embeddings-sdxl/sdrsxlfox.safetensors", "vectors": VECTORS,
                      "widths": WIDTHS},
        "stats": image_stats(img),
        "without_embedding": changed,
        "if_wrong": if_wrong,
        "made_by": "diffusers StableDiffusionXLPipeline (DDIMScheduler.from_config(SCHEDULER)) after "
                   "load_textual_inversion of clip_g into text_encoder_2/tokenizer_2 and clip_l into "
                   "text_encoder/tokenizer",
    }
    save_json({
        "embedding": {
            "file": "embeddings-sdxl/sdrsxlfox.safetensors",
            "layout": "A1111 SDXL: safetensors with exactly 'clip_l' [vectors, 768 (here 4)] for text encoder 1 "
                      "and 'clip_g' [vectors, 1280 (here 8)] for text encoder 2, f32, no metadata; the name is the "
                      "file's stem",
            "name": NAME,
            "vectors": VECTORS,
            "widths": WIDTHS,
            "values": f"torch.randn((2, w), Generator().manual_seed({EMB_SEED})) * {EMB_STD} for clip_l then "
                      "clip_g from the same generator, rounded to bf16 (exact in f16 and bf16); the token tables' "
                      "std is 0.02",
            "bpe_pieces": pieces,
            "clip_ids": name_ids,
        },
        "loading": "pipe.load_textual_inversion(state['clip_g'], token='sdrsxlfox', text_encoder=pipe.text_encoder_2, "
                   "tokenizer=pipe.tokenizer_2); pipe.load_textual_inversion(state['clip_l'], token='sdrsxlfox', "
                   "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer) (diffusers' SDXL documentation)",
        "placement": placement,
        "placement_note": "diffusers adds one token per vector to each tokenizer ('sdrsxlfox', 'sdrsxlfox_1', ids "
                          "49408, 49409, rows appended to the token table) and encode_prompt rewrites the prompt "
                          "with maybe_convert_prompt per tokenizer ('sdrsxlfox' -> 'sdrsxlfox sdrsxlfox_1'); the "
                          "two vectors take positions 3 and 4 (after BOS, 'a', 'tiny'), and 'in the snow', EOS and "
                          "the padding follow at once, so the sequence is 3 tokens shorter than the plain BPE "
                          "tokenization. Checked equal, for both tokenizers, to A1111's placement (the name's CLIP "
                          "ids [s, dr, sx, l, fox</w>] replaced by 2 vectors, BOS, EOS, then 49407 padding for "
                          "tokenizer 1, '!' (0) for tokenizer 2)",
        "pooled_note": "the pooled output (text_encoder_2's text_embeds) changes: it is taken at the first EOS "
                       "(transformers matches eos_token_id 49407, since that is not the legacy 2), which attends to "
                       "the embedding's positions; A1111/sgm pool at the argmax of the plain CLIP ids, the same EOS. "
                       "An argmax over diffusers' ids would pick the added ids 49408/49409 instead",
        "if_wrong": "the case's if_wrong: mad / max_abs_diff (0..255 levels) between the committed image and the "
                    "same run with the two vectors in reverse order (vectors_reversed), or with the pooled output "
                    "taken at the argmax of diffusers' ids (the last added token, position 4; hidden state after "
                    "final_layer_norm, then text_projection) instead of at the first EOS (pooled_at_ids_argmax): a "
                    "test must compare more tightly than that",
        "conditioning": "embeddings_sdxl.safetensors: prompt_embeds [1, 77, 12] = cat(te1 hidden_states[-2], "
                        "te2 hidden_states[-2]) and pooled_prompt_embeds [1, 6] of the prompt with the embedding "
                        "loaded, from pipe.encode_prompt(prompt, do_classifier_free_guidance=False) (f32). The "
                        "encoders are causal, so positions before the embedding equal the plain prompt's",
        "noise": "gen = torch.Generator('cpu').manual_seed(42); latents = torch.randn((1, 4, 8, 8), generator=gen); "
                 "pipe(..., generator=gen, latents=latents, eta=0.0, output_type='np'); image = (x * 255).round()",
        "base_check": f"the same pipeline before loading, on sdxl.json's prompt {xl.PROMPTS[0]!r}, is within "
                      f"{base_diff} level(s) of sdxl/{BASE_CASE}_seed{SEED}.png",
        "scheduler_config": xl.SCHEDULER,
        "cases": [case],
        "versions": versions(),
    }, MANIFEST)
    shutil.rmtree(tok_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
