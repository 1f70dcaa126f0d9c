"""cilbench: a benchmark harness for class-incremental learning with dynamic networks."""
__version__ = "0.1.0"
