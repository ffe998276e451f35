"""``python -m reproduce.export``: entry point; the code is in ``reproduce.deploy.export``."""
import sys

from reproduce.deploy.export import main

if __name__ == "__main__":
    sys.exit(main())
