#!/usr/bin/env bash
# The whole path on the bundled digits data, on CPU. Each stage prints what it made.
set -euo pipefail
out=${1:-runs/demo}
ddpm=.venv/bin/ddpm
mkdir -p "$out"

echo "== schedule: the linear DDPM schedule, respaced to 10 steps"
$ddpm schedule --kind linear --timesteps 1000 --steps 10 --plot "$out/schedule.png"
