"""Benchmarks of the consumer (``python -m benchmarks.throughput``, ``make bench``)."""
