"""`python -m qfm ...`: the qfm command, e.g. under torchrun (`torchrun --nproc-per-node 2 -m qfm train-teacher ...`)."""

import sys

from qfm.cli import main

sys.exit(main())
