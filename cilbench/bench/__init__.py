"""Benchmarks: the data pipeline, each method's phases against bare loops, and the demo."""
