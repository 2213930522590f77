"""A JPEG saved the way A1111 saves one (Pillow with piexif's EXIF, the infotext as a UNICODE
UserComment), for crates/sdrs/src/image_io/exif.rs.

    /opt/venv/bin/python tools/make_exif_fixture.py   # needs pillow and piexif

Writes tests/fixtures/reference/a1111_exif.jpg and a1111_exif.txt (the text). Deterministic."""

import io
import os

import piexif
import piexif.helper
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "..", "tests", "fixtures", "reference")

TEXT = (
    "a lighthouse at dusk, (oil painting:1.2), [storm:calm:0.5]\n"
    "Negative prompt: blurry, é ☃\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3919489211, "
    "Size: 24x16, Model hash: 6ce0161689, Version: v1.10.1"
)


def main():
    # modules/images.py save_image_with_geninfo: piexif.dump of the UserComment, then
    # Pillow's save with exif=.
    exif = piexif.dump(
        {"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(TEXT, encoding="unicode")}}
    )
    image = Image.new("RGB", (24, 16), (40, 90, 160))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80, exif=exif)
    with open(os.path.join(REF, "a1111_exif.jpg"), "wb") as f:
        f.write(out.getvalue())
    with open(os.path.join(REF, "a1111_exif.txt"), "w", encoding="utf-8") as f:
        f.write(TEXT)
    print(f"pillow {Image.__version__}, piexif {piexif.VERSION}: {len(out.getvalue())} bytes")


if __name__ == "__main__":
    main()
