#!/usr/bin/env bash
# Install ovdense in a fresh venv and segment the example VOC photo with ViT-B-16 (OpenAI weights) + SCLIP.
# The first run downloads the weights (~600 MB) through the Hugging Face hub cache.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q -e '.[examples]'
mkdir -p out && python examples/write_example_image.py out/example.jpg
if ! ovdense segment out/example.jpg --classes-file examples/voc21_classes.txt --dataset voc21 \
    --model ViT-B-16 --pretrained openai --method sclip --out out/ --overwrite; then
    cat >&2 <<'HELP'

The ViT-B-16 weights could not be loaded (see the error above). To try the same pipeline without them, run it
on the tiny RANDOM test model (a smoke run: its labels mean nothing):

    . .venv/bin/activate
    ovdense segment out/example.jpg --classes-file examples/voc21_classes.txt --dataset voc21 \
        --model ovdense-test-vit --method sclip --out out/ --overwrite
HELP
    exit 2
fi
echo "open out/example_overlay.png"
