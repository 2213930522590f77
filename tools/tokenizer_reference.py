"""Writes the reference token ids that sdrs' CLIP tokenizer must reproduce.

    /opt/venv/bin/python tools/tokenizer_reference.py            # tests/fixtures/tokenizer/corpus.json
    /opt/venv/bin/python tools/tokenizer_reference.py --codepoints /tmp/codepoints.txt

The reference is transformers' CLIPTokenizer (transformers 5: the `tokenizers`-backed "fast"
tokenizer; the old Python tokenizer with ftfy is gone) over openai/clip-vit-large-patch14's
vocabulary, rebuilt from the embedded BPE list by tools/clip_vocab.py. The corpus mixes
handwritten prompts with generated ones (a fixed seed, so reruns give the same file).

--codepoints writes, for every Unicode scalar value, the ids of a short string built around it;
the ignored Rust test `every_codepoint_matches_reference` compares them (see its doc).
"""

import argparse
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from clip_vocab import write_hf_tokenizer  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "corpus.json")
MAX_LEN = 77
PAD = 49407  # SD 1.x pads with <|endoftext|>

HANDWRITTEN = [
    "",
    " ",
    "     ",
    "\t\n \r\n",
    "a photo of an astronaut riding a horse, 4k!!",
    "a photo of a cat",
    "A Photo Of A CAT",
    "HELLO WORLD",
    "  leading and trailing spaces  ",
    "multiple    spaces\tand\ttabs\n\nand\r\nnewlines",
    "non\u00a0breaking\u00a0space and ideographic\u3000space",
    "zero\u200bwidth joiner\u200d and bom\ufeff here",
    "it's a dog's life, isn't it? we're here, you've got it, I'm sure, we'll see, he'd go",
    "IT'S LOUD, DON'T SHOUT",
    "rock 'n' roll, the '90s, 'quoted', ''double'', '''triple'''",
    "curly \u2018single\u2019 and \u201cdouble\u201d quotes, it\u2019s fine",
    "o'clock o'neil 's 't 're 've 'm 'll 'd 'x 'S 'T",
    "numbers 1 12 123 1234 3.14159 1,000,000 -42 +7 1e10 0x1F 2024-01-31",
    "1920x1080 8k uhd 16:9 f/1.8 50mm 1/250s iso100",
    "\u00bd \u00be \u2153 \u2460 \u2461 \u00b2 \u00b3 \u2167 \u0663\u0664 \u096a\u096b \uff11\uff12",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe fa\u00e7ade",
    "cafe\u0301 decomposed e\u0301 vs composed \u00e9",
    "\u00c9COLE \u00c0 PARIS \u00d1AND\u00da",
    "\u0130stanbul \u0131\u015f\u0131k DIYARBAKIR",
    "\u039f\u0394\u039f\u03a3 \u03bb\u03cc\u03b3\u03bf\u03c2 \u0391\u0398\u0397\u039d\u0391",
    "\u041c\u043e\u0441\u043a\u0432\u0430 \u0437\u0438\u043c\u043e\u0439, \u041a\u0420\u0410\u0421\u041d\u0410\u042f \u041f\u041b\u041e\u0429\u0410\u0414\u042c",
    "\u6771\u4eac\u30bf\u30ef\u30fc \u591c\u666f",
    "\u4e00\u53ea\u732b\u5750\u5728\u7a97\u53f0\u4e0a\uff0c\u9633\u5149\u660e\u5a9a\u3002",
    "\u3053\u3093\u306b\u3061\u306f\u4e16\u754c\uff01\u30ab\u30bf\u30ab\u30ca\uff8a\uff9d\uff76\uff78",
    "\ud55c\uad6d\uc5b4 \ubb38\uc7a5 \ud14c\uc2a4\ud2b8",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e04\u0e23\u0e31\u0e1a",
    "emoji \U0001f600\U0001f431\U0001f680 cat\U0001f408dog",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 flag \U0001f1ef\U0001f1f5 skin \U0001f44d\U0001f3fd",
    "\u2764\ufe0f \u2728 \u2b50 \u2600\ufe0f \u263a",
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39; &nbsp; &copy;",
    "<html><body>a <b>bold</b> prompt</body></html>",
    "path/to/file.png C:\\Users\\me\\img.jpg https://example.com/a?b=c&d=e#f",
    "user@example.com #hashtag @mention $100 50% ^caret ~tilde `backtick`",
    "!!! ??? ... --- ___ *** ### ,,, ;;; ::: ||| ///",
    "masterpiece, best quality, (ultra detailed:1.2), [blurry:0.5], ((sharp focus))",
    "(masterpiece:1.3), (best quality:1.2), 1girl, solo, long hair, looking at viewer",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "[cat:dog:0.5] in a [forest|desert] at (sunset:1.1) BREAK portrait",
    "\\(escaped\\) parens and \\[brackets\\]",
    "tabby cat:0.25 white duck:0.75 hybrid",
    "<lora:detail_tweaker:0.8> <hypernet:foo:1> embedding:bad-hands-5",
    "score_9, score_8_up, rating_safe, source_anime",
    "photo of a woman, 35mm, f/2.8, bokeh, kodak portra 400, film grain",
    "oil painting by greg rutkowski and alphonse mucha, trending on artstation",
    "a <|endoftext|> b",
    "a<|startoftext|>b<|endoftext|>c",
    "<|ENDOFTEXT|> <|StartOfText|>",
    "<|endoftext|>",
    "<|startoftext|><|endoftext|>",
    "<| endoftext |>",
    "a</w>b </w>",
    "don't-stop-believing_now",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "ab" * 40,
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "x" * 200,
    "\u00ff\u00fe\u00fd \u0100\u0101 \u0180 \u01c4 \u01c5 \u01c6 \ufb01 \ufb02 \u1e9e",
    "\u2126 \u212b \u2160 \u24b6 \u1d400 \U0001d400 \U0001d7ce",
    "\u0000 null \u0007 bell \u001b escape \u007f del",
    "\u001c\u001d\u001e\u001f separators \u0085 nel \u2028 ls \u2029 ps",
    "\u180e mongolian \u2000\u2001\u2002\u200a spaces \u202f\u205f",
    "combining a\u0300\u0301\u0302 stacked o\u0308\u0304 marks \u0301 alone",
    "hangul jamo \u1100\u1161\u11a8 composes",
    "\U0010ffff \U000e0001 \ue000 private use",
    "mixed\u00e9caf\u00e9123abc\u4e2d\u6587!!",
    "A1B2C3 a1b2c3 1st 2nd 3rd 4th 10th",
    "...and then... \u2026 ellipsis \u2014 em dash \u2013 en dash",
    "\u00ab guillemets \u00bb \u201e German \u201c \u300c Japanese \u300d",
    "tab\tseparated\tvalues\t",
    "\n\nnewline first",
    "trailing newline\n",
    "a ,b , c,d",
    "(((((((((((((((deep)))))))))))))))",
    "[[[[[nested]]]]]",
    "{curly} <angle> |pipe|",
    "1.0 1.05 1.10 1.15 0.9 0.001",
    "\u00bfqu\u00e9? \u00a1hola!",
    "ALL CAPS SHOUTING PROMPT WITH NUMBERS 123 AND SYMBOLS !@#",
    # Characters newer than tokenizers' Unicode 9 normalisation tables: no composing, no reordering.
    "dives akuru \U00011935\U00011930, vithkuqi \U000105d2\u0307, kirat rai \U00016d67\U00016d67",
    "marks a\u1df6\u0316 e\u0301\u0316 \u0915\u093c\u08d3\u0951 nko \u07ca\u07fd\u07eb",
    "photorealistic, 8k, hdr, (((intricate details))), [[[deformed]]], ugly:-1.0",
]

SUBJECTS = [
    "a cat", "an astronaut", "a castle on a hill", "portrait of an old man", "a red sports car",
    "a bowl of fruit", "cyberpunk city street", "a dragon", "mountain lake at dawn", "a robot chef",
    "Albert Einstein", "the Eiffel Tower", "a cozy cabin", "underwater coral reef", "a samurai",
]
STYLES = [
    "oil painting", "digital art", "photograph", "watercolor", "pixel art", "3D render", "anime style",
    "by Studio Ghibli", "unreal engine 5", "octane render", "ukiyo-e", "charcoal sketch",
]
MODIFIERS = [
    "highly detailed", "sharp focus", "volumetric lighting", "golden hour", "4k", "8k uhd", "HDR",
    "trending on ArtStation", "cinematic", "depth of field", "award-winning", "intricate",
]
CHAR_POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r\u00a0\u3000\u2003",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "\u00e9\u00e8\u00ea\u00eb\u00e0\u00e7\u00f1\u00f6\u00fc\u00df\u00c9\u00d6\u00dc\u0301\u0308",
    "\u4e00\u4e8c\u4e09\u732b\u72d7\u5c71\u6c34\u3042\u3044\u30a2\u30a4\ud55c\uae00",
    "\U0001f600\U0001f431\U0001f680\u2764\ufe0f\u200d\U0001f3fd\u2728",
    "\u2018\u2019\u201c\u201d\u2026\u2014\u00ab\u00bb",
    "\u0391\u03a3\u03c3\u03c2\u0416\u0436\u0130\u0131\u212a\u2126",
]


def generated_prompts(rng):
    prompts = []
    for _ in range(100):
        parts = [rng.choice(SUBJECTS)] + rng.sample(STYLES, 1) + rng.sample(MODIFIERS, rng.randint(1, 4))
        weighted = []
        for part in parts:
            r = rng.random()
            if r < 0.2:
                part = f"({part}:{rng.choice(['0.5', '0.8', '1.1', '1.2', '1.35', '2'])})"
            elif r < 0.3:
                part = f"[{part}]"
            elif r < 0.4:
                part = f"[{part}:{rng.choice(SUBJECTS)}:{rng.choice(['0.2', '0.5', '10'])}]"
            elif r < 0.5:
                part = part.upper()
            weighted.append(part)
        prompts.append(rng.choice([", ", ",", " , ", "  "]).join(weighted))
    for _ in range(120):
        length = rng.randint(1, 40)
        prompts.append("".join(rng.choice(rng.choice(CHAR_POOLS)) for _ in range(length)))
    for n in (60, 76, 77, 78, 120, 300):
        words = [rng.choice(SUBJECTS + STYLES + MODIFIERS) for _ in range(n)]
        prompts.append(", ".join(words))
    for n in (74, 75, 76, 80):
        prompts.append(" ".join(["cat"] * n))
    prompts.append("1234567890" * 10)
    prompts.append("!" * 100)
    prompts.append(" ".join(str(i) for i in range(200)))
    return prompts


def load_tokenizer():
    from transformers import CLIPTokenizer

    folder = tempfile.mkdtemp(prefix="clip-tokenizer-")
    write_hf_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def write_corpus(tok):
    prompts = HANDWRITTEN + generated_prompts(random.Random(20240531))
    entries = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False).input_ids
        padded = tok(text, padding="max_length", truncation=True, max_length=MAX_LEN).input_ids
        assert len(padded) == MAX_LEN, text
        entries.append({"text": text, "ids": ids, "padded": padded})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    import tokenizers
    import transformers

    corpus = {
        "source": f"transformers {transformers.__version__} CLIPTokenizer (tokenizers {tokenizers.__version__})",
        "max_len": MAX_LEN,
        "pad": PAD,
        "prompts": entries,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(corpus, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    print(f"{len(entries)} prompts -> {OUT} ({os.path.getsize(OUT)} bytes)")


def codepoint_probe(c):
    """The probe string for one codepoint: it meets a letter, a digit, itself and punctuation, in
    both cases, so its class (letter, number, whitespace, other), its NFC and lowercase forms all
    show in the ids."""
    return f"A{c}b{c}{c}1{c}.{c}"


def write_codepoints(tok, path):
    scalars = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    backend = tok.backend_tokenizer
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(scalars), 65536):
            chunk = scalars[start : start + 65536]
            encodings = backend.encode_batch([codepoint_probe(chr(cp)) for cp in chunk], add_special_tokens=False)
            for cp, enc in zip(chunk, encodings):
                f.write(f"{cp:x} {' '.join(map(str, enc.ids))}\n")
    print(f"{len(scalars)} codepoints -> {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codepoints", metavar="PATH", help="write the per-codepoint probe ids to PATH instead")
    args = parser.parse_args()
    tok = load_tokenizer()
    if args.codepoints:
        write_codepoints(tok, args.codepoints)
    else:
        write_corpus(tok)


if __name__ == "__main__":
    main()
