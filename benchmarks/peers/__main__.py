"""`python -m benchmarks.peers`: see compare.py."""

import sys

from benchmarks.peers.compare import main

sys.exit(main(sys.argv[1:]))
