#!/usr/bin/env bash
# Fashion-MNIST from the idx files to the app bundle exported/fmnist, every stage in order.
#   bash training/fmnist.sh [--key=value ...]     # shared overrides go to every stage, e.g. --root=runs/try
#   CONFIG=my.yaml BUNDLE=exported/mine ASSETS=/tmp/assets bash training/fmnist.sh    # another recipe or outputs
#   VQGAN=exported/fmnist/vqgan.safetensors bash training/fmnist.sh    # reuse a trained VQGAN (no vqgan stage)
# Each stage resumes from its checkpoint (or skips finished work) when rerun, so after an
# interruption rerun the same command. Stages 'vqgan' and 'ssl' are independent, and so are
# 'stage1' and 'stage2' (the bundled model ran them side by side, one core each).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-training/fmnist.yaml}
BUNDLE=${BUNDLE:-exported/fmnist}
ASSETS=${ASSETS:-assets}
VQGAN=${VQGAN:-}
# root and data as every stage resolves them: the config file, then the overrides
{ read -r ROOT; read -r DATA; } < <(python -c "
import sys
from training.config import RunConfig, parse_config
c = parse_config(RunConfig, sys.argv[1:])
print(c.root); print(c.data)" --config "$CONFIG" "$@")
for stage in ssl features kmeans vqgan stage1 stage2 assemble; do
  reuse=()
  if [[ -n "$VQGAN" ]]; then
    [[ $stage == vqgan ]] && { echo "== vqgan: reusing $VQGAN"; continue; }
    [[ $stage == stage2 || $stage == assemble ]] && reuse=("--vqgan=$VQGAN")
  fi
  echo "== $stage"
  python -m training.$stage --config "$CONFIG" "${reuse[@]}" "$@"
done
# float16 storage halves the bundle; compute stays float32 (see digit_core/export.py)
python -m digit_core.export --model "$ROOT/model" --out "$BUNDLE" --weights float16
python -m training.assets --bundle "$BUNDLE" --data "$DATA" --out "$ASSETS"
echo "== done. Measure it: python -m training.evaluate --bundle=$BUNDLE --data=$DATA --out=reports/$(basename "$BUNDLE")-eval"
