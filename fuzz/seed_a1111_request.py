#!/usr/bin/env python3
"""Writes the seed corpus of the `a1111_request` fuzz target: a few A1111 request bodies.

    python3 fuzz/seed_a1111_request.py      (writes fuzz/corpus/a1111_request/*.json)

Only the standard library; the init image is an 8x8 PNG made here.
"""
import base64
import json
import pathlib
import struct
import zlib


def png_8x8():
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    # Filter byte 0, then RGB for each of the 8 pixels of each row.
    rows = b"".join(
        b"\x00" + bytes(v for x in range(8) for v in (x * 30, y * 30, 90)) for y in range(8))
    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def main():
    out = pathlib.Path(__file__).resolve().parent / "corpus" / "a1111_request"
    out.mkdir(parents=True, exist_ok=True)
    init = base64.b64encode(png_8x8()).decode()
    bodies = {
        "minimal": {},
        "txt2img": {"prompt": "a (red:1.2) boat, [fog]", "negative_prompt": "blurry",
                    "width": 64, "height": 48, "steps": 4, "seed": 42,
                    "sampler_name": "Euler a", "scheduler": "Karras", "batch_size": 2,
                    "n_iter": 1, "cfg_scale": 6.5, "override_settings": {},
                    "alwayson_scripts": {}, "send_images": True, "save_images": False},
        "aliases": {"sampler_index": "DPM++ 2M Karras", "scheduler": "SGM Uniform",
                    "hr_sampler_name": None, "seed": -1, "clip_skip": 2},
        "hires": {"prompt": "x", "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
                  "hr_second_pass_steps": 3, "denoising_strength": 0.6},
        "img2img": {"init_images": ["data:image/png;base64," + init], "prompt": "x",
                    "denoising_strength": 0.5, "resize_mode": 1, "steps": 2},
        "img2img_sized": {"init_images": [init], "width": 128, "height": 64},
        "limits": {"prompt": "(" * 200, "n_iter": 10000, "batch_size": 8,
                   "width": 8192, "height": 8},
    }
    for name, body in bodies.items():
        (out / f"{name}.json").write_text(json.dumps(body))
    (out / "not_json.txt").write_bytes(b'{"prompt": "unterminated')
    print(f"wrote {len(bodies) + 1} seeds to {out}")


if __name__ == "__main__":
    main()
