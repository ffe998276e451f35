"""``python -m reproduce.teacher_cache``: entry point; the code is in ``reproduce.training.teacher_cache``."""
import sys

from reproduce.training.teacher_cache import main

if __name__ == "__main__":
    sys.exit(main())
