#!/usr/bin/env bash
# The packaged default SideNet from scratch: stage 1 (the memory-delta SideNet, ~65 min on a 2-core
# CPU here), stage 2 (the copy head with exact matches on top of it, ~10 min), stage 3 (the copy
# head learns to answer questions about synthetic stated facts, ~15 min), stage 4 (a style adapter
# trained on text read without memory, ~8 min) and stage 5 (the memory path refitted under it, ~10 min).
# Needs `longmem data books`.
# Run it again after an interruption: each stage resumes from its latest checkpoint.
#   bash scripts/train-default.sh [--stage1-only] [--stage2-only] [--stage3-only] [--stage4-only] [--install]
# --install copies the result over the packaged default (src/longmem/assets/sidenets/smollm2-135m/).
set -euo pipefail
stage2=1 stage3=1 stage4=1 stage5=1 install=0
for arg in "$@"; do
  case "$arg" in
    --stage1-only) stage2=0 stage3=0 stage4=0 stage5=0 ;;
    --stage2-only) stage3=0 stage4=0 stage5=0 ;;
    --stage3-only) stage4=0 stage5=0 ;;
    --stage4-only) stage5=0 ;;
    --install) install=1 ;;
    *) echo "train-default.sh: unknown option $arg (use --stage1-only, --stage2-only, --stage3-only, --stage4-only, --install)" >&2; exit 2 ;;
  esac
done
resume() { if [ -f "$1/latest.json" ]; then echo --resume; fi; }
# stage 1: the memory-delta SideNet with the short-term tier and the long-term bank
longmem train configs/longmem-default.yaml $(resume runs/longmem-default)
out=runs/longmem-default/sidenet
if [ "$stage2" = 1 ]; then  # stage 2: the copy head on top of it (only the head's scalars train)
  longmem train configs/longmem-copy.yaml --set init_from=runs/longmem-default/sidenet $(resume runs/longmem-copy-local)
  out=runs/longmem-copy-local/sidenet
fi
if [ "$stage3" = 1 ]; then  # stage 3: synthetic facts teach the head when a question restates one
  longmem train configs/longmem-facts.yaml --set init_from=runs/longmem-copy-local/sidenet $(resume runs/longmem-facts)
  out=runs/longmem-facts/sidenet
fi
if [ "$stage4" = 1 ]; then  # stage 4: a style adapter, trained on text read without memory
  longmem train configs/longmem-style.yaml --set init_from=runs/longmem-facts/sidenet $(resume runs/longmem-style)
  out=runs/longmem-style/sidenet
fi
if [ "$stage5" = 1 ]; then  # stage 5: the memory path trained again under the style adapter
  longmem train configs/longmem-refit.yaml --set init_from=runs/longmem-style/sidenet $(resume runs/longmem-refit)
  out=runs/longmem-refit/sidenet
fi
if [ "$install" = 1 ]; then
  cp "$out/config.json" "$out/model.safetensors" src/longmem/assets/sidenets/smollm2-135m/
fi
