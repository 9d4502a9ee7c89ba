"""One process per run folder: ``train`` holds an exclusive lock on ``--out`` for the run's duration, so a second
``train --overwrite`` (or ``--resume``) into a folder another process is training in is refused instead of mixing
two runs' files (config of one, metrics of the other)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class RunFolderBusy(RuntimeError):
    """Another process is training into the run folder."""


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """``flock`` on the folder itself (no lock file to leave behind or to be cleared by ``--overwrite``); released
    when the run ends or its process dies. A path that is a file is left to the caller's own check."""
    if out.exists() and not out.is_dir():
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise OSError(f"--out {out}: cannot write there ({exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"--out {out} is in use: another medbridge process is training into it; wait for "
                                "it to finish, or choose another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock
