#!/usr/bin/env bash
# The packaged default SideNet from scratch, through the shipped recipe (configs/stage*.yaml, ~2.5 h on 2 CPU
# cores for SmolLM2-135M; docs/training.md): stage 1 (the memory-delta SideNet, ~65 min), stage 2 (the copy head,
# ~10 min), stage 3 (synthetic facts, ~15 min), stage 4 (the style adapter, ~7 min), stage 5 (the memory path
# refitted under it, ~8 min), stage 6 (keyed recall: the copy head on facts asked by key, ~37 min). Needs
# `longmem data books`. Run it again after an interruption: each stage resumes from its latest checkpoint, and
# a finished stage is skipped.
#   bash scripts/train-default.sh [--until N] [--install] [--backbone ID_OR_PATH] [--out DIR] [--device D] [--eval]
# --until N stops after stage N; --install copies the result over the packaged default
# (src/longmem/assets/sidenets/smollm2-135m/; only for the built-in backbone).
# --backbone runs the same stages for any backbone the seam knows (an HF id, a directory or a .gguf file): the
# memory layer, copy-head layer and widths come from its config; its stages go to --out (default
# runs/<backbone name>). --device sets where to train (default auto). --eval ends with
# scripts/eval-default.sh on the result, into DIR/results.
set -euo pipefail
cd "$(dirname "$0")/.."
until=6 install=0 backbone="" out="" device="" evaluate=0
while [ $# -gt 0 ]; do
  case "$1" in
    --until) until=${2:?--until needs a stage number}; shift ;;
    --install) install=1 ;;
    --backbone) backbone=${2:?--backbone needs an HF id, a directory or a .gguf file}; shift ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    --device) device=${2:?--device needs auto, cpu or cuda}; shift ;;
    --eval) evaluate=1 ;;
    *) echo "train-default.sh: unknown option $1 (use --until N, --install, --backbone ID, --out DIR," \
            "--device D, --eval)" >&2; exit 2 ;;
  esac
  shift
done
case "$until" in 1|2|3|4|5|6) ;; *) echo "train-default.sh: --until must be 1..6, not $until" >&2; exit 2 ;; esac
if [ "$install" = 1 ] && [ -n "$backbone" ]; then
  echo "train-default.sh: --install replaces the built-in backbone's SideNet; not with --backbone" >&2; exit 2
fi
if [ -z "$out" ]; then
  if [ -n "$backbone" ]; then name=$(basename "${backbone%/}"); out=runs/${name%.gguf}; else out=runs/default; fi
fi
stages=(stage1-memory stage2-copy-head stage3-facts stage4-style stage5-refit stage6-keyed)
for i in $(seq 1 "$until"); do
  dir=$out/stage$i
  if [ -f "$dir/sidenet/config.json" ]; then continue; fi  # finished
  args=()
  if [ "$out" != runs/default ]; then  # the run files name runs/default/...: this recipe's own folders instead
    args+=(--set "output_dir=$dir")
    if [ "$i" -gt 1 ]; then args+=(--set "init_from=$out/stage$((i - 1))/sidenet"); fi
  fi
  if [ -n "$backbone" ] && [ "$i" = 1 ]; then args+=(--set "model.backbone=$backbone"); fi  # later stages: its SideNet's
  if [ -n "$device" ]; then args+=(--device "$device"); fi
  if [ -f "$dir/latest.json" ]; then args+=(--resume); fi
  longmem train "configs/${stages[$((i - 1))]}.yaml" "${args[@]}"
done
if [ "$install" = 1 ]; then
  cp "$out/stage$until/sidenet/config.json" "$out/stage$until/sidenet/model.safetensors" \
    src/longmem/assets/sidenets/smollm2-135m/
fi
if [ "$evaluate" = 1 ]; then
  bash scripts/eval-default.sh "$out/stage$until/sidenet" "$out/results"
fi
