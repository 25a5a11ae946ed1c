"""``python -m m2d_kernels.train``: the ``m2d-train`` command."""

import sys

from m2d_kernels.train.cli import main

sys.exit(main())
