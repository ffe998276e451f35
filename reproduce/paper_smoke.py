"""``python -m reproduce.paper_smoke``: entry point; the code is in ``reproduce.bench.paper_smoke``."""
import sys

from reproduce.bench.paper_smoke import main

if __name__ == "__main__":
    sys.exit(main())
