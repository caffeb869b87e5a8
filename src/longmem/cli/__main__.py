"""``python -m longmem.cli`` (e.g. under torchrun) runs the ``longmem`` command."""

import sys

from longmem.cli.main import main

sys.exit(main())
