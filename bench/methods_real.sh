#!/usr/bin/env bash
# Every method end to end through the CLI on the real default model and data, at one small budget
# (STEPS optimizer steps of 16 examples), then one summary line per method. CPU: ~4 min a method.
#   STEPS=40 bash bench/methods_real.sh [method ...]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
STEPS=${STEPS:-40}
methods=("$@")
[ ${#methods[@]} -gt 0 ] || mapfile -t methods < <(ls params/methods | sed 's/\.yaml$//')
$BIN/peftflow convert-base
$BIN/peftflow prepare
for m in "${methods[@]}"; do
  run="bench-$m-$STEPS"
  $BIN/peftflow train -m "$m" --no-resume -s train.max_steps="$STEPS" -s train.eval_every=0 -s train.save_every=0 \
    -s train.warmup_steps=4 -s train.run_name="$run"
  $BIN/peftflow evaluate --run "runs/$run"
done
$BIN/python - "$STEPS" "${methods[@]}" <<'PY'
import json, sys
steps, methods = sys.argv[1], sys.argv[2:]
print(f"{'method':11} {'trainable':>13} {'%':>7} {'accuracy':>8} {'loss':>7} {'tok/s':>6} {'peak GiB':>8} {'artifact MiB':>12}")
for m in methods:
    r = json.load(open(f"runs/bench-{m}-{steps}/metrics.json"))
    print(f"{m:11} {r['trainable_params']:>13,} {r['trainable_pct']:>7.3f} {100 * r['test_accuracy']:>7.1f}% "
          f"{r['test_loss']:>7.4f} {r['tokens_per_s']:>6.0f} {r['peak_memory_bytes'] / 2**30:>8.2f} "
          f"{r['artifact_bytes'] / 2**20:>12.2f}")
print(f"zero-shot accuracy: {100 * r['zeroshot']['test_accuracy']:.1f}%")
PY
