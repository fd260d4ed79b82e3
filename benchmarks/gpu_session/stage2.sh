#!/usr/bin/env bash
# GPU session, call 2 of 2 (issue #23 parts 2 and 5), at once after call 1 on the same warm machine:
# the loader's headroom over part 1's model rate, then the full-tower transfer runs.
# Carry .gpu/stage2. About 6 minutes on an H200.
source benchmarks/gpu_session/common.sh
started=$SECONDS
if [ ! -f "$KEEP/minilm-l6/model.safetensors" ] || [ ! -d "$KEEP/openmoji_jpeg" ]; then
    echo "error: call 1's files are not on this machine (it was given back between the calls, or call 1 failed): run call 1 again, then this one at once."
    exit 3
fi
install_wheels .gpu/stage2/wheels/*.whl
export MMTRANSFER_NOTO_FONT="$PWD/.gpu/stage2/fonts/NotoColorEmoji.ttf"

if [ "$SMOKE" = 1 ]; then
    loader=(--workers 0 --batch-size 16 --epochs 1); transfer=(--seeds 0 --parallel 2 --fast-dev-run); precision=no; limit=(300 900)
else
    loader=(--workers 4 8 12 16 --batch-size 256 --epochs 2); transfer=(--parallel 6); precision=bf16; limit=(100 300)
fi
timeout "${limit[0]}" "$PY" benchmarks/data_pipeline.py --data "$KEEP/openmoji_jpeg" --tokenizer "$KEEP/minilm-l6" \
    --image-tower vit_base_patch16_224 --augment-only --pin-memory --gpu-decode "${loader[@]}" \
    --model-results "$KEEP/throughput/results.json" --json "$OUT/loader.json" 2>&1 | tee "$OUT/loader.log"

# 6 runs side by side on 16 cores: 2 torch threads each, their loader workers one each.
OMP_NUM_THREADS=2 timeout "${limit[1]}" "$PY" benchmarks/full_tower_transfer.py --out "$KEEP/transfer" "${transfer[@]}" \
    --set "train.mixed_precision=$precision" train.num_workers=4 "model.text.name=$PWD/$KEEP/minilm-l6" \
    --eval-set train.num_workers=4 > "$OUT/transfer.log" 2>&1
tail -15 "$OUT/transfer.log"
cp "$KEEP/transfer/results.json" "$OUT/transfer.json" 2>/dev/null
cp "$KEEP/transfer/table.md" "$OUT/transfer.md" 2>/dev/null
echo "call 2 finished in $((SECONDS - started)) s"
