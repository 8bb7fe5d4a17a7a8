import sys

from pararnn_bench.cli import main

sys.exit(main())
