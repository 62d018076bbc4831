#!/usr/bin/env bash
# The whole path on the bundled 8x8 digits data, on CPU: train -> export ONNX -> run 1000 steps -> bench.
# Each stage prints what it made. Re-running reuses nothing: every artifact is rebuilt.
set -euo pipefail
out=${1:-runs/demo}
ddpm=.venv/bin/ddpm
mkdir -p "$out"
start=$SECONDS

echo "== 1/5 schedule: the linear DDPM schedule (T=1000), respaced to 10 steps"
$ddpm schedule --kind linear --timesteps 1000 --steps 10 --plot "$out/schedule.png"

echo "== 2/5 train: tiny UNet on the 8x8 digits (EMA weights -> $out/digits/model.safetensors)"
$ddpm train --data digits --out "$out/digits" --threads 1 ${DEMO_TRAIN_ARGS:-}
$ddpm info "$out/digits/model.safetensors"

echo "== 3/5 export: checkpoint -> ONNX, parity against PyTorch at batch 1 and 7"
$ddpm export --ckpt "$out/digits/model.safetensors" --out "$out/unet.onnx"

echo "== 4/5 run: 1000 DDPM steps through onnxruntime + the fused C++ step kernel"
$ddpm run --engine "$out/unet.onnx" --steps 1000 --num-samples 64 --batch 64 --seed 0 \
  --out "$out/samples.png" --npz "$out/samples.npz" --no-progress

echo "== 5/5 bench: the same engine against eager PyTorch (short loop)"
$ddpm bench --engine "$out/unet.onnx" --ckpt "$out/digits/model.safetensors" --batch 1,64 --steps 100 \
  --device cpu --repeats 10 --loop-budget 5 --json "$out/bench.json"

echo "== done in $((SECONDS - start)) s: samples in $out/samples.png, the training preview in $out/digits/"
