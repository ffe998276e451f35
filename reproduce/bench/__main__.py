"""``python -m reproduce.bench``: the benchmark suite (reproduce.bench.suite)."""
import sys

from reproduce.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
