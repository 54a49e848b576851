"""fastalign's benchmarks: pytest-benchmark suites, run with `make bench` or `python -m benchmarks`."""
