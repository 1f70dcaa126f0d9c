"""One run: resolve, the task loop, evaluation, metrics, the run directory, the lock."""
