#!/usr/bin/env bash
# Held-out measurements of a trained SideNet (default: the last stage of scripts/train-default.sh).
#   bash scripts/eval-default.sh [SIDENET_DIR] [OUT_DIR]
# Needs `longmem data books`. Writes JSON (each with its command and config) to OUT_DIR.
set -euo pipefail
SIDENET=${1:-runs/default/stage6/sidenet}
OUT=${2:-results/default}
BOOKS=(data/books/test/austen-persuasion.txt data/books/test/austen-emma.txt)
mkdir -p "$OUT"
# memory / empty memory / backbone / short-term tier only / another Austen novel's memory / 2048 sliding window
longmem ppl "${BOOKS[@]}" --sidenet "$SIDENET" --compare --foreign-memory data/books/train/austen-mansfieldpark.txt \
  --window 2048 --max-tokens 24576 --json --quiet > "$OUT/heldout.json.tmp" && mv "$OUT/heldout.json.tmp" "$OUT/heldout.json"
# a control from another author: the KJV Bible's memory
longmem ppl "${BOOKS[@]}" --sidenet "$SIDENET" --foreign-memory data/books/train/kjv-bible.txt \
  --max-tokens 24576 --json --quiet > "$OUT/heldout-kjv.json.tmp" && mv "$OUT/heldout-kjv.json.tmp" "$OUT/heldout-kjv.json"
# passkey: a 5-digit key once in 4k-32k tokens of held-out prose, read with memory vs the same local window
longmem eval passkey --sidenet "$SIDENET" --lengths 4096,8192,16384,32768 --depths 0,0.25,0.5,0.75,1 --trials 2 \
  --memory-size 65536 \
  --modes memory,no-memory --quiet --out "$OUT/passkey.json"
# keyed recall (RULER-style): every task at 4k, with memory vs the same local window
longmem eval recall --sidenet "$SIDENET" --lengths 4096 --trials 10 --modes memory,no-memory --quiet \
  --out "$OUT/recall.json"
