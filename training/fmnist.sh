#!/usr/bin/env bash
# Fashion-MNIST from the idx files to the app bundle exported/fmnist, every stage in order.
#   bash training/fmnist.sh [--key=value ...]     # overrides go to every stage, e.g. --root=runs/try
# Each stage resumes from its checkpoint (or skips finished work) when rerun, so after an
# interruption rerun the same command. Stages 'vqgan' and 'ssl' are independent, and so are
# 'stage1' and 'stage2' (the bundled model ran them side by side, one core each).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=training/fmnist.yaml
ROOT=$(python -c "import yaml,sys; print(yaml.safe_load(open('$CONFIG'))['root'])")
for arg in "$@"; do case $arg in --root=*) ROOT=${arg#--root=};; esac; done
for stage in ssl features kmeans vqgan stage1 stage2 assemble; do
  echo "== $stage"
  python -m training.$stage --config $CONFIG "$@"
done
# float16 storage halves the bundle; compute stays float32 (see digit_core/export.py)
python -m digit_core.export --model "$ROOT/model" --out exported/fmnist --weights float16
python -m training.assets --bundle exported/fmnist --data fmnist --out assets
echo "== done. Measure it: python -m training.evaluate --bundle=exported/fmnist --data=fmnist --out=reports/fmnist-eval"
