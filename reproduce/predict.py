"""``python -m reproduce.predict``: entry point; the code is in ``reproduce.deploy.predict``."""
import sys

from reproduce.deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())
