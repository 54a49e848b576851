"""fastalign against the tools users would pick instead (TRL, TRL with Liger-Kernel), end to end.

`python -m benchmarks.peers` (or `make bench-peers`); see __main__.py."""
