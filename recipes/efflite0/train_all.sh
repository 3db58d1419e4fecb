#!/usr/bin/env bash
# Train DualToken (d) and the three single-vocabulary variants of variants.sh side by side, each with the same
# recipe (default.json), optionally time-boxed; each exports the tokenizer every checkpoint.every steps, so the
# comparison can take the largest step every variant reached (pack.py).
# usage: recipes/efflite0/train_all.sh OUT_ROOT [SECONDS] [extra dualtoken-train arguments...]
set -u -f
out=${1:-runs/ablation}
seconds=${2:-0}
shift $(( $# < 2 ? $# : 2 ))
python=${PYTHON:-python3}
source "$(dirname "$0")/variants.sh"
mkdir -p "$out"
for name in "${!VARIANTS[@]}"; do
  command=("$python" -m dualtoken train --config recipes/efflite0/default.json --set "output_dir=$out/$name" ${VARIANTS[$name]} "$@")
  if [ "$seconds" -gt 0 ]; then
    timeout -s INT "$seconds" "${command[@]}" > "$out/$name.log" 2>&1 &
  else
    "${command[@]}" > "$out/$name.log" 2>&1 &
  fi
done
wait
set +f
echo "done: $(ls -d "$out"/*/export-* 2>/dev/null | wc -l) exports under $out"
