#!/usr/bin/env bash
# The CPU recipe end to end: train on 128 px crops (recipes/efflite0/cpu.json, about an hour on a 2-core CPU),
# ship the final export at 256 px in float16 as the embedded default, and evaluate it as docs/RESULTS.md reports.
# usage: recipes/efflite0/train_cpu.sh [RUN_DIR]        (run from the repository root, with the venv active)
set -euo pipefail
run=${1:-runs/efflite0-cpu}
python=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
"$python" -m dualtoken train --config recipes/efflite0/cpu.json --set "output_dir=$run" --set log.progress=false
echo "trained in $(( $(date +%s) - start )) s"
"$python" recipes/efflite0/ship.py "$run/final"
"$python" -m dualtoken eval --model dualtoken-efflite0 --data ../shared/data/kodak --out "$run/eval/kodak"
"$python" -m dualtoken eval --model dualtoken-efflite0 --data recipes/efflite0/heldout.tsv \
    --labels recipes/efflite0/heldout.tsv --metrics semantic reconstruction --out "$run/eval/heldout"
