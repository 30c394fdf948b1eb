#!/usr/bin/env bash
# Fashion-MNIST from the idx files to the app bundle exported/fmnist, every stage in order.
#   bash training/fmnist.sh [--key=value ...]     # overrides go to every stage, e.g. --root=runs/try
# Each stage resumes from its checkpoint (or skips finished work) when rerun, so after an
# interruption rerun the same command. Stages 'vqgan' and 'ssl' are independent.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=training/fmnist.yaml
ROOT=$(python -c "import yaml,sys; print(yaml.safe_load(open('$CONFIG'))['root'])")
for arg in "$@"; do case $arg in --root=*) ROOT=${arg#--root=};; esac; done
for stage in ssl features kmeans vqgan stage1 stage2 assemble; do
  echo "== $stage"
  python -m training.$stage --config $CONFIG "$@"
done
python -m digit_core.export --model "$ROOT/model" --out exported/fmnist
