"""``python -m reproduce.evaluate``: entry point; the code is in ``reproduce.evaluation.evaluate``."""
import sys

from reproduce.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
