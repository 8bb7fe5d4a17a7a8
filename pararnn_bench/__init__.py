"""ParaRNN benchmarks (the ``pararnn-bench`` command); see pararnn_bench.cli."""
