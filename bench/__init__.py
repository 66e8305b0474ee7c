"""The benchmark: `make bench` (python -m bench.run) from the repository root."""
