"""``python -m mtl_utils.experiments``: see :mod:`mtl_utils.experiments.cli`."""

import sys

from mtl_utils.experiments.cli import main

sys.exit(main())
