#!/usr/bin/env bash
# The CUDA measurements of benchmarks/train_speed.py, fp32 and bf16, on the first GPU (a few minutes):
#
#   FASHION_ROOT=/path/to/fashion-mnist bash benchmarks/cuda_speed.sh [OUT_DIR]
#
# FASHION_ROOT holds Fashion-MNIST's four IDX .gz files (Debian: apt-get install dataset-fashion-mnist puts them in
# /usr/share/datasets/fashion-mnist, the default). Results: OUT_DIR/train_speed_cuda_{fp32,bf16}.md (default
# benchmarks/results). CIFAR is left out; add --cifar-root DIR to the train_speed.py lines to time ResNet-18 too.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
root=${FASHION_ROOT:-/usr/share/datasets/fashion-mnist}
mkdir -p "$out"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this script measures the GPU path"
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY
for precision in fp32 bf16; do
    python benchmarks/train_speed.py --device cuda --precision "$precision" --fashion-root "$root" \
        --steps 300 --repeats 5 --data-batches 300 --out "$out/train_speed_cuda_$precision.md"
done
