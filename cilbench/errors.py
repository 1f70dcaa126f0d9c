"""Errors a user can fix: the CLI prints them on one line and exits with code 2."""


class UserError(Exception):
    """Bad input (unknown name, ill-typed key, missing data, ...). The message names culprit and fix."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite, or exploded while finite; the run is marked failed with the task and
    epoch named."""

    def __init__(self, task: int, epoch: int, phase: str, loss: float | None = None,
                 reference: float | None = None, factor: float | None = None):
        """`task` and `epoch` are 0-based; the message counts from 1 like the progress output. `loss`,
        `reference` and `factor` describe a finite divergence (the engine's divergence_factor check)."""
        fix = "lower the learning rate or enable clipping (--set train.clip_norm=1.0)"
        if loss is None:
            text = f"non-finite loss in task {task + 1}, epoch {epoch + 1} ({phase} phase); {fix}"
        else:
            text = (f"loss diverged in task {task + 1}, epoch {epoch + 1} ({phase} phase): mean {loss:.3g} is "
                    f"over {factor:g}x the phase's initial {reference:.3g}; {fix}, or turn the check off "
                    "with --set runtime.divergence_factor=0")
        super().__init__(text)
        self.task, self.epoch, self.phase = task, epoch, phase


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption): handled like Ctrl-C, leaving an interrupted, resumable run;
    the CLI exits with 143 (128 + SIGTERM)."""
