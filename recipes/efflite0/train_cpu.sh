#!/usr/bin/env bash
# Stage 1 of the pipeline (recipes/efflite0/README.md) end to end: train on 128 px crops (recipes/efflite0/cpu.json,
# about an hour on a 2-core CPU), re-target the final export to 256 px in float16 beside it (RUN_DIR/final-256; the
# package's shipped model is left alone: the semantic stages start from RUN_DIR/final), and evaluate that as
# docs/RESULTS.md reports.
# usage: recipes/efflite0/train_cpu.sh [RUN_DIR]        (run from the repository root, with the venv active)
set -euo pipefail
run=${1:-runs/efflite0-cpu}
python=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
"$python" -m dualtoken train --config recipes/efflite0/cpu.json --set "output_dir=$run" --set log.progress=false
echo "trained in $(( $(date +%s) - start )) s"
"$python" recipes/efflite0/ship.py "$run/final" --out "$run/final-256" --name dualtoken-efflite0-cpu
"$python" -m dualtoken eval --model "$run/final-256" --data ../shared/data/kodak --out "$run/eval/kodak"
"$python" -m dualtoken eval --model "$run/final-256" --data recipes/efflite0/heldout.tsv \
    --labels recipes/efflite0/heldout.tsv --metrics semantic reconstruction --out "$run/eval/heldout"
