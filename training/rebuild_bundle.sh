#!/usr/bin/env bash
# Rebuild an app bundle and its assets from committed float16 stage weights, without training:
#   bash training/rebuild_bundle.sh [WEIGHTS_DIR] [BUNDLE] [CONFIG]
# defaults: the label-trained model, weights/fmnist-supervised -> exported/fmnist-supervised
# (about a minute on a CPU; the app lists the bundle once it exists). The VQGAN is read from
# exported/fmnist/vqgan.safetensors (VQGAN=... for another).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-weights/fmnist-supervised}
BUNDLE=${2:-exported/fmnist-supervised}
CONFIG=${3:-training/fmnist_supervised.yaml}
ASSETS=${ASSETS:-assets}
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
python -m training.assemble --config "$CONFIG" --root="$ROOT" --workers=0 \
  --encoder="$W/encoder/encoder.safetensors" --codebook="$W/codebook/codebook.safetensors" \
  --vqgan="${VQGAN:-exported/fmnist/vqgan.safetensors}" --stage1="$W/stage1/stage1.safetensors" --stage2="$W/stage2/stage2.safetensors"
# the VQ graphs (and the VQGAN file they read) are the default bundle's, byte for byte: list, don't copy
python -m digit_core.export --model "$ROOT/model" --out "$BUNDLE" --weights float16 --share-with exported/fmnist
[[ -f "$W/MODEL_CARD.md" ]] && cp "$W/MODEL_CARD.md" "$BUNDLE/"   # the card travels with the weights
python -m training.assets --bundle "$BUNDLE" --data fmnist --out "$ASSETS"
echo "== rebuilt $BUNDLE from $W"
