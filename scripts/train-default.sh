#!/usr/bin/env bash
# The packaged default SideNet from scratch, through the shipped recipe (configs/stage*.yaml, ~2 h on 2 CPU
# cores; docs/training.md): stage 1 (the memory-delta SideNet, ~65 min), stage 2 (the copy head, ~10 min),
# stage 3 (synthetic facts, ~15 min), stage 4 (the style adapter, ~7 min), stage 5 (the memory path refitted
# under it, ~8 min), stage 6 (keyed recall: the copy head on facts asked by key, ~25 min). Needs `longmem data books`. Run it again after an interruption: each stage resumes from
# its latest checkpoint, and a finished stage is skipped.
#   bash scripts/train-default.sh [--until N] [--install]
# --until N stops after stage N; --install copies the result over the packaged default
# (src/longmem/assets/sidenets/smollm2-135m/).
set -euo pipefail
cd "$(dirname "$0")/.."
until=6 install=0
while [ $# -gt 0 ]; do
  case "$1" in
    --until) until=${2:?--until needs a stage number}; shift ;;
    --install) install=1 ;;
    *) echo "train-default.sh: unknown option $1 (use --until N, --install)" >&2; exit 2 ;;
  esac
  shift
done
case "$until" in 1|2|3|4|5|6) ;; *) echo "train-default.sh: --until must be 1..6, not $until" >&2; exit 2 ;; esac
stages=(stage1-memory stage2-copy-head stage3-facts stage4-style stage5-refit stage6-keyed)
for i in $(seq 1 "$until"); do
  out=runs/default/stage$i
  if [ -f "$out/sidenet/config.json" ]; then continue; fi  # finished
  resume=(); if [ -f "$out/latest.json" ]; then resume=(--resume); fi
  longmem train "configs/${stages[$((i - 1))]}.yaml" "${resume[@]}"
done
if [ "$install" = 1 ]; then
  cp "runs/default/stage$until/sidenet/config.json" "runs/default/stage$until/sidenet/model.safetensors" \
    src/longmem/assets/sidenets/smollm2-135m/
fi
