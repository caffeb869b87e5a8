#!/usr/bin/env bash
# The evaluation suite's full protocols (every ChapterBreak boundary at 4k/8k/16k, ICL with 6 seeds and
# every test sentence, whole held-out books, the passkey grid), LongMem against MemTRM and the backbone.
#   bash experiments/full-evals.sh [--memtrm DIR]      (MemTRM: `longmem train configs/memtrm.yaml` first)
# ~40 h on a 2-core CPU. Run it again after an interruption: finished results are skipped, and the
# unfinished run resumes from its partial file (`--resume`). Results in results/full/.
set -euo pipefail
MEMTRM=runs/memtrm/sidenet
while [ $# -gt 0 ]; do
  case $1 in
    --memtrm) MEMTRM=$2; shift 2 ;;
    *) echo "full-evals.sh: unknown option $1 (use --memtrm DIR)" >&2; exit 2 ;;
  esac
done
OUT=results/full
mkdir -p "$OUT"

run() {  # run OUT_JSON EVAL ARGS...: skipped when OUT_JSON exists (a finished run)
  local out=$OUT/$1; shift
  if [ -f "$out" ]; then echo "done already: $out"; return; fi
  echo "running: longmem eval $* --out $out"
  longmem eval "$@" --quiet --out "$out"
}

run chapterbreak-longmem.json chapterbreak --modes memory,no-memory,backbone,window-2048,window-8192 --resume
run chapterbreak-memtrm.json chapterbreak --sidenet "$MEMTRM" --modes memory,no-memory --resume
run icl-longmem.json icl --resume
run ppl-longmem.json ppl --windows 2048,8192 --resume
run ppl-memtrm.json ppl --sidenet "$MEMTRM" --memory-sizes 0,65536 --chunk-sizes '' --no-backbone --resume
run passkey-longmem.json passkey --modes memory,no-memory,backbone,short-term-only,window,window-8192 --resume
run icl-memtrm.json icl --sidenet "$MEMTRM" --modes memory,no-memory --resume
