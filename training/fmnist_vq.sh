#!/usr/bin/env bash
# The VQ-AR baseline bundle exported/fmnist-vq (paper Table 3a): the bundled model's stage-1 GPT,
# same recipe and budget (training/fmnist.yaml's stage1 section), trained on the VQGAN's own ids
# instead of discriminative tokens, so there is no tokenizer and no stage 2. It shares the VQ
# graphs and the VQGAN file with exported/fmnist (which must exist), so it adds only its stage 1.
#   bash training/fmnist_vq.sh [--key=value ...]      # e.g. --root=runs/try; rerun to resume
# The committed exported/fmnist-vq ran half that budget: bash training/fmnist_vq.sh --steps=3000
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-training/fmnist.yaml}
BASE=${BASE:-exported/fmnist}
BUNDLE=${BUNDLE:-exported/fmnist-vq}
VQGAN=${VQGAN:-$BASE/vqgan.safetensors}
ROOT=$(python -c "
import sys
from training.config import RunConfig, parse_config
print(parse_config(RunConfig, sys.argv[1:]).root)" --config "$CONFIG" "$@")
echo "== stage1 --tokens=vq"
python -m training.stage1 --config "$CONFIG" --tokens=vq --vqgan="$VQGAN" "$@"
echo "== assemble --tokens=vq"
python -m training.assemble --config "$CONFIG" --tokens=vq --vqgan="$VQGAN" --name=fmnist-vq "$@"
python -m digit_core.export --model "$ROOT/model_vq" --out "$BUNDLE" --weights float16 --share-with "$BASE"
echo "== done: $BUNDLE (python app.py, then 'Compare with' $BUNDLE)"
