#!/usr/bin/env bash
# The whole path on the bundled 8x8 digits data, on CPU: train -> export ONNX -> run 1000 steps -> bench.
# Each stage prints what it made. Re-running reuses nothing: every artifact is rebuilt.
set -euo pipefail
out=${1:-runs/demo}
ddpm=.venv/bin/ddpm
mkdir -p "$out"
start=$SECONDS

echo "== 1/7 schedule: the linear DDPM schedule (T=1000), respaced to 10 steps"
$ddpm schedule --kind linear --timesteps 1000 --steps 10 --plot "$out/schedule.png"

echo "== 2/7 train: tiny UNet on the 8x8 digits (EMA weights -> $out/digits/model.safetensors)"
$ddpm train --data digits --out "$out/digits" --threads 1 ${DEMO_TRAIN_ARGS:-}
$ddpm info "$out/digits/model.safetensors"

echo "== 3/7 export: checkpoint -> ONNX, parity against PyTorch at batch 1 and 7"
$ddpm export --ckpt "$out/digits/model.safetensors" --out "$out/unet.onnx"

echo "== 4/7 run: 1000 DDPM steps through onnxruntime + the fused C++ step kernel"
$ddpm run --engine "$out/unet.onnx" --steps 1000 --num-samples 64 --batch 64 --seed 0 \
  --out "$out/samples.png" --npz "$out/samples.npz" --no-progress

echo "== 5/7 run: DPM-Solver++(2M) in 20 steps (50x fewer network calls), same seed"
$ddpm run --engine "$out/unet.onnx" --sampler dpm++2m --steps 20 --num-samples 64 --batch 64 --seed 0 \
  --out "$out/samples_dpm20.png" --npz "$out/samples_dpm20.npz" --no-progress

echo "== 6/7 eval: sample quality of both runs against the real digits (with the real-vs-real scale)"
$ddpm eval "$out/samples.npz" --ref digits --save-ref "$out/digits_ref.npz"
$ddpm eval "$out/samples_dpm20.npz" --ref "$out/digits_ref.npz"

echo "== 7/7 bench: the same engine against eager PyTorch (short loop)"
$ddpm bench --engine "$out/unet.onnx" --ckpt "$out/digits/model.safetensors" --batch 1,64 --steps 100 \
  --device cpu --repeats 10 --loop-budget 5 --json "$out/bench.json" --plot "$out/bench.png"

echo "== done in $((SECONDS - start)) s: samples in $out/samples.png, the training preview in $out/digits/"
