#!/usr/bin/env bash
# `make demo`: the whole path on the embedded demo data, end to end.
#   plan -> distill (DGKD, plus the student trained alone for comparison)
#   -> export to ONNX with parity validation -> accuracy in onnxruntime -> latency benchmark
# Teacher: the pretrained CIFAR-10 resnet20 shipped in compressor/assets (BSD-2, see its LICENSE).
set -euo pipefail
cd "$(dirname "$0")/.."
C=${COMPRESS:-.venv/bin/compress}
OUT=${DEMO_OUT:-demo-out}
TEACHER=compressor/assets/resnet20_cifar10_pretrained.safetensors
rm -rf "$OUT"
mkdir -p "$OUT"
# the guide-logit and latency caches of this run live in it: nothing is written outside it
export COMPRESS_CACHE=${COMPRESS_CACHE:-$OUT/cache}
start=$(date +%s)

echo "== 1/6 plan: which assistants go between resnet20 and resnet8"
$C plan --recipe recipes/demo.yaml --teacher "$TEACHER" --target resnet8 --json "$OUT/plan.json"

echo; echo "== 2/6 distill with DGKD: teacher -> assistant -> student (recipes/demo.yaml)"
# no latency column here: step 6 times the student that is shipped (ONNX and torch)
$C distill --teacher "$TEACHER" --target resnet8 --recipe recipes/demo.yaml --latency-backend none --out "$OUT/dgkd"

echo; echo "== 3/6 baseline: the same student trained alone (cross-entropy, same recipe and seed)"
$C distill --teacher "$TEACHER" --target resnet8 --recipe recipes/demo.yaml --method ce \
  --latency-backend none --out "$OUT/ce"

echo; echo "== 4/6 export the DGKD student to ONNX and prove parity with PyTorch"
$C export --onnx "$OUT/dgkd" --data demo --out "$OUT/student.onnx"

echo; echo "== 5/6 accuracy of the ONNX file in onnxruntime (CI floor: 40%)"
$C eval "$OUT/student.onnx" --data demo --min-accuracy 40 --json "$OUT/eval_onnx.json"

echo; echo "== 6/6 latency: onnxruntime vs PyTorch eager"
$C bench "$OUT/student.onnx" --torch --checkpoint "$OUT/dgkd/student.safetensors" --batch-size 1,32 \
  --seconds 2 --json "$OUT/bench.json"

echo
.venv/bin/python examples/demo_results.py "$OUT" "$(( $(date +%s) - start ))"
