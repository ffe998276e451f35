"""``python -m reproduce.stages``: entry point; the code is in ``reproduce.data.stages``."""
import sys

from reproduce.data.stages import main

if __name__ == "__main__":
    sys.exit(main())
