#!/usr/bin/env python3
"""Writes the seed corpora of the `prompt` and `image` fuzz targets from the fixtures.

    python3 fuzz/seed.py [path/to/sdrs]     (writes fuzz/corpus/{prompt,image}/)

`prompt`: every prompt of the reference manifests and the tokenizer corpus, each behind a
step-count byte. `image`: a few fixture PNGs, and JPEGs that the `sdrs` binary (default
target/debug/sdrs) makes from them, one of them with an EXIF orientation segment spliced in.
Only the standard library.
"""
import json
import pathlib
import struct
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CORPUS = ROOT / "fuzz" / "corpus"


def prompts():
    found = set()
    for manifest in ["reference/prompt.json", "reference/prompt_pipeline.json",
                     "reference/txt2img.json", "tokenizer/corpus.json"]:
        data = json.loads((FIXTURES / manifest).read_text())
        for case in data.get("cases", []) + data.get("prompts", []):
            for key in ["prompt", "negative_prompt", "text"]:
                if isinstance(case.get(key), str):
                    found.add(case[key])
            for text in case.get("texts", []):
                found.add(text)
    found.update(["a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
                  "tabby cat:0.25 white duck:0.75 hybrid",
                  "[a:b:0.5] AND [c|d] BREAK e:0.3", "\\(x\\) [from::3] ((("])
    out = CORPUS / "prompt"
    out.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(sorted(found)):
        (out / f"{i:04}").write_bytes(bytes([20]) + text.encode())
    return len(found)


def exif_orientation(value):
    """An APP1 segment holding a little-endian TIFF with one Orientation tag."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHII", 0x0112, 3, 1, value) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + tiff
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def images(sdrs):
    out = CORPUS / "image"
    out.mkdir(parents=True, exist_ok=True)
    pngs = [FIXTURES / "upscale" / "input.png"] + sorted((FIXTURES / "reference" / "img2img").glob("*.png"))[:3]
    for png in pngs:
        (out / png.name).write_bytes(png.read_bytes())
    jpeg = out / "input.jpg"
    if not jpeg.exists():
        subprocess.run([sdrs, "upscale", "--scale", "1", str(pngs[0]), str(jpeg)], check=True)
    data = jpeg.read_bytes()
    (out / "rotated.jpg").write_bytes(data[:2] + exif_orientation(6) + data[2:])
    return len(list(out.iterdir()))


def main():
    sdrs = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target" / "debug" / "sdrs")
    print(f"prompt: {prompts()} seeds; image: {images(sdrs)} seeds in {CORPUS}")


if __name__ == "__main__":
    main()
