"""Speed and memory benchmarks (``python -m reproduce.bench``, ``make bench``): the suite, deployment, paper scale."""
