"""``python -m bench`` from a checkout: the same command as ``pararnn-bench`` (the package is pararnn_bench;
this folder is not installed, so it cannot clash with another ``bench`` in a user's environment)."""

import sys

from pararnn_bench.cli import main

sys.exit(main())
