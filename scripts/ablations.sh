#!/usr/bin/env bash
# Issue "make the memory matter", item 2: one-setting-at-a-time comparisons at a short, equal budget
# (configs/ablation-base.yaml: 50 steps, 0.1M tokens, ~10-18 min each on a 2-core CPU here), then
# results/ablations/summary.json + table.md (python scripts/ablation_table.py). Needs `longmem data books`.
# (results/ablations/delta-temperature was run with a learned memory temperature, model.memory_temperature,
# at commit 56037ff; it had no effect and was deleted.)
# Run it again after an interruption: finished variants are skipped, a started one resumes.
#   bash scripts/ablations.sh [NAME...]      (default: every variant, in this order)
set -euo pipefail
declare -A SETS=(
  [delta-joint]=""
  [paper-gated]="model.init=paper model.fusion=gated"
  [identity-joint]="model.init=identity"
  [delta-gated]="model.fusion=gated"
  [delta-no-recall]="recall_prob=0"
  [delta-memory-block]="trainable=memory_block"
  [delta-no-tier]="model.recent_tokens=0"
  [delta-lr1e-3]="lr=1.0e-3"
  [identity-gated]="model.init=identity model.fusion=gated"
  [delta-fixed]="model.position_scheme=fixed"
  [delta-pre-rotary]="model.position_scheme=pre_rotary"
  [delta-joint-seed1]="seed=1"
  [delta-gated-seed1]="model.fusion=gated seed=1"
  [delta-lr1e-3-seed1]="lr=1.0e-3 seed=1"
)
ORDER=(delta-joint paper-gated identity-joint delta-gated delta-no-recall delta-memory-block
       delta-no-tier delta-lr1e-3 identity-gated delta-fixed delta-pre-rotary delta-joint-seed1 delta-gated-seed1 delta-lr1e-3-seed1)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
  [ -n "${SETS[$name]+x}" ] || { echo "ablations.sh: unknown variant $name (${ORDER[*]})" >&2; exit 2; }
done
for name in "${names[@]}"; do
  run=runs/ablate/$name out=results/ablations/$name
  if [ -f "$out/metrics.jsonl" ] && grep -q '"split"' "$out/metrics.jsonl"; then echo "$name: done"; continue; fi
  args=(--set "output_dir=$run")
  for kv in ${SETS[$name]}; do args+=(--set "$kv"); done
  [ -f "$run/latest.json" ] && args+=(--resume)
  echo "== $name: longmem train configs/ablation-base.yaml ${args[*]}"
  start=$SECONDS
  longmem train configs/ablation-base.yaml "${args[@]}"
  mkdir -p "$out"
  cp "$run/metrics.jsonl" "$run/train_config.json" "$out/"
  echo "{\"variant\": \"$name\", \"set\": \"${SETS[$name]}\", \"seconds\": $((SECONDS - start))}" > "$out/run.json"
done
python scripts/ablation_table.py
