"""The model: a frozen Hugging Face backbone (the one seam to HF: backbone.py, families.py, hf_cache.py),
the trainable SideNet (blocks, attention kernels, style adapter, copy head) and LongMemModel, which joins them."""

from longmem.model.longmem import LongMemModel, LongMemOutput

__all__ = ["LongMemModel", "LongMemOutput"]
