"""Side-by-side benchmarks of this package against its peers: `python -m bench` (or `make bench`)."""
