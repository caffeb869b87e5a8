"""Measure the packaged SideNet's golden numbers again and write tests/golden/packaged-sidenet.json.

    python tests/golden/update.py
Only after a change meant to change the packaged model's outputs (say why in the commit).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_golden import GOLDEN, GOLDEN_SETTINGS, measure  # noqa: E402

from longmem.model.longmem import LongMemModel  # noqa: E402

if __name__ == "__main__":
    values = measure(LongMemModel.from_pretrained("default", **GOLDEN_SETTINGS))
    GOLDEN.write_text(json.dumps(values, indent=1) + "\n")
    print(json.dumps({k: v for k, v in values.items() if k != "logprobs"}))
