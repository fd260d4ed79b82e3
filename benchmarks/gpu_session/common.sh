# Sourced by stage1.sh and stage2.sh, from the repository root on the GPU machine.
# SMOKE=1 runs the same steps small on a CPU (tiny towers, fast dev runs): a check of the scripts.
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:?OUT is the folder the device tool brings back}
KEEP=.gpu/keep  # ignored by git: stays on the machine between the two calls while it is warm
SMOKE=${SMOKE:-0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1
export PYTHONPATH="$PWD/$KEEP/site:$PWD/src"
export MMTRANSFER_CACHE_DIR="$PWD/$KEEP/cache" MMTRANSFER_OPENMOJI_FONT="$PWD/$KEEP/glyf_colr0.ttf"
mkdir -p "$KEEP" "$OUT"

install_wheels() {  # the carried wheels, into .gpu/keep/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KEEP/site" "$@" \
        || { echo "error: installing the carried wheels failed"; exit 3; }
}
