#!/usr/bin/env bash
# The GPU check on a lent GPU machine (no package index; its own Python 3.12 and torch): install
# the carried wheelhouse (make wheelhouse) beside the machine's torch, put this checkout on
# PYTHONPATH (elinspect without its pinned dependencies), run experiments/gpu_check.py.
# The table goes to $OUT/gpu_check.md. Exits non-zero on any failure. Paste-able device call:
#   run(command="OUT=$OUT bash scripts/gpu_check.sh", carry=["wheelhouse"], timeout_s=480)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results}
PY=${PYTHON:-python3}
site=$(mktemp -d)/site
echo "== wheelhouse: $(ls wheelhouse/*.whl | wc -l) wheels -> $site"
"$PY" -m pip install -q --no-index --no-deps --target "$site" wheelhouse/*.whl
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PY" -m elinspect.info || true
echo "== $PY experiments/gpu_check.py --out $OUT $*"
"$PY" experiments/gpu_check.py --out "$OUT" "$@"
