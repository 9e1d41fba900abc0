#!/usr/bin/env bash
# The one prepared GPU run (issue 11): CUDA correctness, then the speed table, in one go.
#   bash scripts/gpu_check.sh [OUT_DIR]        # on a machine with CUDA and this project installed
# Writes OUT_DIR/{tests.log, bench.md}; about 5-8 minutes on one H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/tests.log"
# correctness first: the triton backend against cuDNN and the PyTorch loop, compiled
timeout 300 python -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_triton.py -k "cuda or compile" 2>&1 | tail -30 | tee -a "$out/tests.log"
# speed: ratio to cuDNN per scheme and path, every config (small, medium, large, long, long B128)
timeout 420 python scripts/bench_rnn.py --device cuda --rounds 5 --reps 3 --python-row \
    --step-row --graph-row 2>&1 | tee "$out/bench.md"
