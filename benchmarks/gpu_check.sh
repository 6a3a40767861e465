#!/usr/bin/env bash
# The native kernels and stage two at real size on a CUDA GPU, in about 10 minutes (sized for one H200):
#   1. correctness: tests/test_kernels.py -k cuda (each native kernel against the exact path within its
#      documented bound, on 21 and 7 tokens; checkpoint bytes back bit for bit after attach on the GPU;
#      resident bytes; auto takes every native kernel), ~1 min;
#   2. latency: benchmarks/bench_inference.py --device cuda (every recipe format on the real layer shapes
#      and the SDXL / Flux blocks, exact / dequant / native against bf16 and float32), ~2-3 min;
#   3. stage two at real size: benchmarks/bench_scale.py --device cuda --blockwise --dtype bfloat16 (random
#      weights from the real configs, quantized block by block in a fresh `diffquant quantize` process per
#      recipe): the SDXL base UNet (all of it, 1024 px) with int8_weight_only, nvfp4 and int8_w8a8, then the
#      FLUX.1-dev transformer at the real width but 8 of its 19 double-stream and 16 of its 38
#      single-stream blocks (5.0 B of 11.9 B parameters, to fit the time box; 1024 px, 512 text tokens)
#      with int8_weight_only and nvfp4; peak RSS and torch.cuda.max_memory_allocated over the model bytes,
#      and the phase times. Each family is time-boxed on its own (150 s and 200 s); finished recipes keep
#      their rows when the box runs out. ~5-6 min.
# Installs nothing. Needs: python with torch (CUDA build), diffusers, accelerate, safetensors, pyyaml
# and pytest importable (the project's `test` extra), run from a checkout of the project.
# Results go to $OUT when set (else benchmarks/gpu_check_out/): pytest.txt, bench_inference_cuda.md,
# bench_scale_cuda.md (with bench_scale_cuda_{sdxl,flux}.log: each run's progress), environment.txt.
# Step 3 needs ~20 GB of free disk for its temporary models (TMPDIR).
#
# Dry run on a machine without a GPU (the CUDA tests skip, the benchmarks run quick on the CPU: step 3 on
# small-width models, 2 prompts x 2 steps, int8_weight_only only):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
RESULTS="${OUT:-benchmarks/gpu_check_out}"
QUICK=()
if [[ -n "${GPU_CHECK_QUICK:-}" ]]; then QUICK=(--quick); fi
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRANSFORMERS_VERBOSITY=error

"$PYTHON" - "$DEVICE" > "$RESULTS/environment.txt" <<'EOF'
import sys
import torch
device = sys.argv[1]
print("torch", torch.__version__, "cuda", torch.version.cuda)
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch; run it on a GPU machine (or set GPU_CHECK_DEVICE=cpu for a dry run)")
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
else:
    print("device cpu (dry run)", torch.backends.cpu.get_cpu_capability())
EOF
cat "$RESULTS/environment.txt"

echo "== correctness (pytest -k cuda)"
status=0
timeout 120 "$PYTHON" -m pytest -q -rs tests/test_kernels.py -k cuda -p no:cacheprovider 2>&1 | tee "$RESULTS/pytest.txt" || status=$?

echo "== latency (bench_inference.py --device $DEVICE)"
timeout 170 "$PYTHON" benchmarks/bench_inference.py --device "$DEVICE" --threads 1 "${QUICK[@]}" \
    > "$RESULTS/bench_inference_$DEVICE.md.tmp" || status=$?
mv "$RESULTS/bench_inference_$DEVICE.md.tmp" "$RESULTS/bench_inference_$DEVICE.md"
cat "$RESULTS/bench_inference_$DEVICE.md"

echo "== stage two at real size (bench_scale.py --device $DEVICE --blockwise --dtype bfloat16)"
SCALE=(--device "$DEVICE" --blockwise --dtype bfloat16 --drop-checkpoints "${QUICK[@]}")
FLUX_SIZE=(--layers 8)
SDXL_RECIPES=int8_weight_only,nvfp4,int8_w8a8
FLUX_RECIPES=int8_weight_only,nvfp4
if [[ -n "${GPU_CHECK_QUICK:-}" ]]; then
    SCALE+=(--prompts 2 --steps 2); FLUX_SIZE=(); SDXL_RECIPES=int8_weight_only; FLUX_RECIPES=int8_weight_only
fi
SCALE_TABLE="$RESULTS/bench_scale_$DEVICE.md"
rm -f "$SCALE_TABLE" "$RESULTS/bench_scale_${DEVICE}_sdxl.md" "$RESULTS/bench_scale_${DEVICE}_flux.md"
timeout 150 "$PYTHON" benchmarks/bench_scale.py --family sdxl "${SCALE[@]}" --recipes "$SDXL_RECIPES" \
    --table "$RESULTS/bench_scale_${DEVICE}_sdxl.md" > /dev/null 2> "$RESULTS/bench_scale_${DEVICE}_sdxl.log" || status=$?
timeout 200 "$PYTHON" benchmarks/bench_scale.py --family flux "${SCALE[@]}" "${FLUX_SIZE[@]}" --recipes "$FLUX_RECIPES" \
    --table "$RESULTS/bench_scale_${DEVICE}_flux.md" > /dev/null 2> "$RESULTS/bench_scale_${DEVICE}_flux.log" || status=$?
for family in sdxl flux; do
    if [[ -f "$RESULTS/bench_scale_${DEVICE}_$family.md" ]]; then
        cat "$RESULTS/bench_scale_${DEVICE}_$family.md"
        rm "$RESULTS/bench_scale_${DEVICE}_$family.md"
    else
        printf '## Stage two at real size (%s): no recipe finished\n\nLast lines of bench_scale_%s_%s.log:\n\n```\n%s\n```\n' \
            "$family" "$DEVICE" "$family" "$(tail -n 5 "$RESULTS/bench_scale_${DEVICE}_$family.log")"
    fi
    echo
done > "$SCALE_TABLE"
cat "$SCALE_TABLE"
exit "$status"
