"""Load benchmarks run with h2load over loopback (``make bench``); see ``bench/README.md``."""
