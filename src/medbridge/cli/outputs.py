"""Run folders of commands that fail: a folder the command created is removed again unless it holds something
resumable (a training checkpoint, a finished run's or fold's metrics)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RESUMABLE = ("checkpoint.pt", "metrics.json")  # engine/trainer.py CHECKPOINT; a finished run or fold


@contextmanager
def removed_on_failure(out: str | Path) -> Iterator[None]:
    """Remove ``out`` if the block fails with an error and ``out`` did not exist before it; an interrupt (Ctrl-C),
    a folder given by the user, or one with resumable progress is kept (``--resume`` continues it)."""
    out = Path(out)
    existed = out.exists()
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        if not existed and out.is_dir() and not any(p.name in RESUMABLE for p in out.rglob("*")):
            shutil.rmtree(out, ignore_errors=True)
        raise


__all__ = ["RESUMABLE", "removed_on_failure"]
