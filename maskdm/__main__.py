"""``python -m maskdm ...`` (also what torchrun runs: ``torchrun --nproc_per_node N -m maskdm train ...``)."""

import sys

from .cli import main

sys.exit(main())
