#!/usr/bin/env bash
# GPU session, call 1 of 2 (issue #23 part 1): the throughput table of benchmarks/gpu_throughput.py.
# Carry .gpu/stage1 (python benchmarks/gpu_session/pack.py pack). Results go to $OUT; what call 2
# needs stays in .gpu/keep. About 5 minutes on an H200.
source benchmarks/gpu_session/common.sh
started=$SECONDS
install_wheels .gpu/stage1/wheels/*.whl
cp .gpu/stage1/fonts/glyf_colr0.ttf "$KEEP/"
"$PY" benchmarks/gpu_session/pack.py restore-text .gpu/stage1/minilm-l6 "$KEEP/minilm-l6" || exit 3
{ date -u; nvidia-smi 2>&1 | head -15; "$PY" - <<'PYEOF'
import os, platform, torch
from importlib.metadata import version
print(platform.platform(), "python", platform.python_version(), "cores", os.cpu_count())
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
print(", ".join(f"{p} {version(p)}" for p in ("torch", "torchvision", "transformers", "accelerate", "timm", "datasets",
                                                "open-clip-torch", "pyarrow", "fsspec", "huggingface-hub", "numpy", "pillow")))
PYEOF
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# Part 2's JPEG folder and part 5's OpenMoji set, built on 3 of the CPU cores while the GPU runs part 1.
( "$PY" scripts/render_emoji_font.py "$MMTRANSFER_OPENMOJI_FONT" --out "$KEEP/openmoji_jpeg" --splits train --image-size 224 --format jpeg \
  && "$PY" -c "from mmtransfer.data import load; [load('openmoji', split=s, emoji={'num_proc': 2}) for s in ('train', 'unseen')]" \
) > "$OUT/prepare.log" 2>&1 &

if [ "$SMOKE" = 1 ]; then
    args=(--device cpu --towers tiny --batch-size 4 --steps 1 --warmup 1 --tokens 16 --only ours open_clip plain); limit=300
else
    args=(--device cuda --steps 15 --warmup 3); limit=270
fi
timeout "$limit" "$PY" benchmarks/gpu_throughput.py "${args[@]}" --tokenizer "$KEEP/minilm-l6" --timeout 150 --profile ours \
    --out "$KEEP/throughput" 2>&1 | tee "$OUT/throughput.log"
cp "$KEEP"/throughput/* "$OUT/" 2>/dev/null
wait
echo "call 1 finished in $((SECONDS - started)) s; data for call 2: $(ls "$KEEP" | tr '\n' ' ')"
