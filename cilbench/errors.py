"""Errors a user can fix: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input (unknown name, ill-typed key, missing data, ...). The message names culprit and fix."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the run is marked failed with the task and epoch named."""

    def __init__(self, task: int, epoch: int, phase: str):
        """`task` and `epoch` are 0-based; the message counts from 1 like the progress output."""
        super().__init__(f"non-finite loss in task {task + 1}, epoch {epoch + 1} ({phase} phase); "
                         "lower the learning rate or enable clipping (--set train.clip_norm=1.0)")
        self.task, self.epoch, self.phase = task, epoch, phase
