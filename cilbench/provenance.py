"""Where code came from: the git commit of a checkout (cilbench's own, or a plug-in's folder)."""
from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit(folder: str | Path) -> str | None:
    """The short commit hash of the git checkout holding `folder`, or None (not a checkout, no git)."""
    folder = Path(folder)
    folder = folder if folder.is_dir() else folder.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
