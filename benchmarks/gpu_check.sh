#!/usr/bin/env bash
# The native kernels on a CUDA GPU, in at most 5 minutes (sized for one H200):
#   1. correctness: tests/test_kernels.py -k cuda (each native kernel against the exact path within its
#      documented bound, on 21 and 7 tokens; checkpoint bytes back bit for bit after attach on the GPU;
#      resident bytes; auto takes every native kernel), ~1 min;
#   2. latency: benchmarks/bench_inference.py --device cuda (every recipe format on the real layer shapes
#      and the SDXL / Flux blocks, exact / dequant / native against bf16 and float32), ~2-3 min.
# Installs nothing. Needs: python with torch (CUDA build), diffusers, accelerate, safetensors, pyyaml
# and pytest importable (the project's `test` extra), run from a checkout of the project.
# Results go to $OUT when set (else benchmarks/gpu_check_out/): pytest.txt, bench_inference_cuda.md,
# environment.txt.
#
# Dry run on a machine without a GPU (the CUDA tests skip, the benchmark runs quick on the CPU):
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
    > "$RESULTS/bench_inference_$DEVICE.md.tmp"
mv "$RESULTS/bench_inference_$DEVICE.md.tmp" "$RESULTS/bench_inference_$DEVICE.md"
cat "$RESULTS/bench_inference_$DEVICE.md"
exit "$status"
