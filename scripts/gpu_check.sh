#!/usr/bin/env bash
# GPU host check: ConvNeXt-T -> fp32/fp16/bf16 ONNX -> TensorRT fp16/bf16 engines -> parity; ORT CUDA parity; pytest -m gpu.
# Usage: scripts/gpu_check.sh [repository-dir]   (needs: pip install -e '.[export,gpu,dev]' and an NVIDIA GPU)
set -euo pipefail
REPO="${1:-$(mktemp -d)/models}"
PY="${PYTHON:-python}"

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
"$PY" -c "import tensorrt, onnxruntime as ort; print('tensorrt', tensorrt.__version__, '| ort', ort.__version__, ort.get_available_providers())"

echo "== export convnext_tiny (random init) -> fp32 + fp16 + bf16 ONNX, parity vs PyTorch / ORT"
"$PY" -m export onnx --model convnext_tiny --name convnext-tiny --repository "$REPO" --precisions fp32,fp16,bf16

for precision in fp16 bf16 fp32; do
  echo "== TensorRT $precision engine + parity vs ONNX Runtime fp32"
  "$PY" -m export tensorrt --name convnext-tiny --repository "$REPO" --precision "$precision" \
    --min-batch 1 --opt-batch 8 --max-batch 32 || echo "!! TensorRT $precision failed (see above)"
done

echo "== ONNX Runtime CUDA provider parity vs CPU fp32"
"$PY" - "$REPO" <<'PYEOF'
import sys
from export.repository import ModelRepository
from export.verify import compare, default_image_paths, run_onnxruntime, verification_inputs
version = ModelRepository(sys.argv[1]).load("convnext-tiny")
m = version.manifest
inputs = verification_inputs(m.preprocess, default_image_paths())
reference = run_onnxruntime(version.artifact_path(m.find("onnx", "fp32")), inputs.batch)
for precision in ("fp32", "fp16"):
    out = run_onnxruntime(version.artifact_path(m.find("onnx", precision)), inputs.batch,
                          providers=("CUDAExecutionProvider",))
    p = compare(reference, out, "onnxruntime-cpu-fp32", inputs.num_real_images)
    print(f"ORT CUDA {precision}: max|diff| {p.max_abs_diff:.3g} top-1 {p.top1_agreement:.3f} "
          f"top-5 {p.top5_agreement:.3f} on {p.num_inputs} inputs ({p.num_real_images} real)")
PYEOF

echo "== manifest"
"$PY" -m export list --repository "$REPO"

echo "== pytest -m gpu"
"$PY" -m pytest -m gpu -q tests/gpu
