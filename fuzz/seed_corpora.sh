#!/bin/sh
# Seeds fuzz/corpus/<target>/ for every target from the small files of tests/fixtures (nothing big is copied or
# committed: the corpora are made here, at run time). Run from anywhere; safe to rerun.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
fixtures="$here/../tests/fixtures"
max=200000 # bytes: larger files make slow inputs without reaching more code

mkdir -p "$here/corpus/checkpoint" "$here/corpus/pickle" "$here/corpus/safetensors_header"

# torch zips: whole small files for `checkpoint`, their data.pkl alone for `pickle`.
find "$fixtures" \( -name '*.pth' -o -name '*.ckpt' -o -name '*.bin' \) -size -${max}c |
while read -r f; do
    name=$(echo "${f#$fixtures/}" | tr '/' '_')
    cp "$f" "$here/corpus/checkpoint/$name"
done
# Every torch zip's data.pkl, the big ones included (their pickles are small).
find "$fixtures" \( -name '*.pth' -o -name '*.ckpt' -o -name '*.bin' \) |
while read -r f; do
    name=$(echo "${f#$fixtures/}" | tr '/' '_')
    python3 - "$f" "$here/corpus/pickle/$name.pkl" <<'PY'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
pkl = [n for n in z.namelist() if n.endswith("data.pkl")][0]
data = z.read(pkl)
if len(data) <= 200000:
    open(sys.argv[2], "wb").write(data)
PY
done

# safetensors: small files whole; of the larger ones, the header and the first data bytes.
find "$fixtures" -name '*.safetensors' |
while read -r f; do
    name=$(echo "${f#$fixtures/}" | tr '/' '_')
    head -c $max "$f" > "$here/corpus/safetensors_header/$name"
done

for t in checkpoint pickle safetensors_header; do
    echo "$t: $(ls "$here/corpus/$t" | wc -l) seeds"
done

# lora: the fixture LoRAs (the big ones cut to their header and first tensors) behind the
# five bytes that pick a weight of [64, 64], [32, 32] or [32, 32, 3, 3]; and a few layers in the
# shape mode's layout (part, number of sides, sides): up [4, 2] and down [2, 4]; LoHa; LoKr.
mkdir -p "$here/corpus/lora"
for f in "$fixtures"/lora/*; do
    name=$(basename "$f")
    for target in '\002\077\077\000\000' '\002\037\037\000\000' '\006\037\037\002\002'; do
        { printf "$target"; head -c $max "$f"; } > "$here/corpus/lora/$name-$(printf "$target" | od -An -tx1 | tr -d ' \n')"
    done
done
printf '\003\003\003\000\000\000\002\004\002\001\002\002\004\003\000' > "$here/corpus/lora/shape-lora"
printf '\003\003\003\000\000\005\002\004\002\006\002\002\004\007\002\004\002\010\002\002\004' > "$here/corpus/lora/shape-loha"
printf '\003\003\003\000\000\013\002\002\002\016\002\002\002' > "$here/corpus/lora/shape-lokr"
echo "lora: $(ls "$here/corpus/lora" | wc -l) seeds"

# The prompt, image and request targets: fixture prompts and pictures (JPEGs made by the sdrs
# binary, $SDRS or target/debug/sdrs), and a few A1111 request bodies.
python3 "$here/seed.py" "${SDRS:-$here/../target/debug/sdrs}"
python3 "$here/seed_a1111_request.py"
