"""Benchmarks that need the package's internals (run as ``python -m gqsa.bench.kernel``)."""
