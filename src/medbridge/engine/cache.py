"""Frozen-activation cache: what no trainable parameter touches is computed once per (image, view) and reused.

One folder per key (backbones' fingerprints, what is cached, view config, preprocessing and the images' paths,
sizes and modification times); inside, one fp16 memory-mapped file per tensor with a row per image, a CRC-32 per
row of each tensor (``<name>.crc32``) and ``done.npy`` marking rows that are complete. Rows are marked done only
after their data and checksums are flushed, so an interrupted build resumes where it stopped; any change of a key
part gives a new folder. Distributed builds: each rank fills its own rows and marks them in ``done.rank<r>.npy``.

Nothing on disk is trusted blindly: file sizes are checked before mapping (rows a truncated file lost are rebuilt),
each row's checksum is verified the first time this process reads it (a damaged row is rebuilt through
:attr:`FeatureCache.repair` when the builder set it, else an error), the space is checked and reserved with
``posix_fallocate`` before anything is written (a full disk is an error message, not a SIGBUS), and a lock file
serialises builders of the same folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write_bytes

CACHE_FORMAT = "medbridge-cache/2"  # /2: per-row checksums
LOCK_FILE = "build.lock"
META_FILE = "meta.json"
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
log = logging.getLogger(__name__)


class CacheError(RuntimeError):
    """The cache cannot be built or read (damaged beyond repair, in use, wrong size); the message names the
    folder or file."""


class CacheSpaceError(CacheError):
    """Not enough disk space (or budget) for a cache: the message says which folder, how much is needed and how
    much is free."""

    errno = errno.ENOSPC

    def __init__(self, message: str, folder: Path | None = None, needed: int = 0, free: int = 0) -> None:
        super().__init__(message)
        self.folder, self.needed, self.free = folder, needed, free


# ----------------------------------------------------------------------------------------------- sizes and disk
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(value: str | float | int) -> int:
    """Bytes from ``123``, ``'500M'``, ``'1.5GiB'``, ``'2TB'`` (K/M/G/T alone are binary units)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size (expected e.g. 500M, 20G, 1.5TiB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: Path) -> int:
    """Free space (for this user) on the file system that holds ``path`` or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def on_disk_bytes(folder: Path) -> int:
    """Bytes the files of ``folder`` actually occupy (allocated blocks; sparse holes do not count)."""
    total = 0
    for f in Path(folder).glob("*"):
        with contextlib.suppress(OSError):
            total += f.stat().st_blocks * 512
    return total


@contextlib.contextmanager
def disk_errors(folder: Path, needed: int = 0) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT from any cache write into a :class:`CacheSpaceError` naming the folder and sizes."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in SPACE_ERRNOS:
            raise
        free = free_bytes(folder)
        need = f"{format_size(needed)} needed, " if needed else ""
        raise CacheSpaceError(f"no space left for the frozen-activation cache in {folder} ({need}"
                              f"{format_size(free)} free): free space there, or move the cache with "
                              "train.cache_dir / MEDBRIDGE_CACHE, or pick a smaller train.cache mode",
                              folder, needed, free) from exc


# ----------------------------------------------------------------------------------------------- keys and layout
def image_keys(paths: list[Path]) -> list[list]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_folder(root: str | Path, parts: dict, n_rows: int, shapes: dict[str, tuple[int, ...]]) -> Path:
    """The folder of the cache with these key parts (whether it exists or not)."""
    return Path(root) / cache_key({**parts, "shapes": shapes, "rows": n_rows, "format": CACHE_FORMAT})


def row_bytes(shape: tuple[int, ...]) -> int:
    return 2 * int(np.prod(shape))


def cache_bytes(n_rows: int, shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of a complete cache: the fp16 arrays and their per-row checksums."""
    return sum(n_rows * (row_bytes(s) + 4) for s in shapes.values())


def done_mask(folder: Path, n_rows: int) -> np.ndarray:
    """Rows marked done by any rank (all False when the folder does not exist)."""
    mask = np.zeros(n_rows, dtype=bool)
    for f in Path(folder).glob("done*.npy"):
        try:
            part = np.load(f)
        except (OSError, ValueError):
            continue  # a half-written flag file: its rows are recomputed
        if part.shape == mask.shape:
            mask |= part
    return mask


@contextlib.contextmanager
def build_lock(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Exclusive ``flock`` on ``folder/build.lock`` while filling: a second builder of the same cache waits (and
    then finds the rows done) instead of computing everything again. Released when the process dies."""
    if not enabled:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with disk_errors(folder), open(folder / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another process is building the cache %s: waiting for it to finish", folder)
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.warning("cache %s free after %.0f s; continuing with the rows still missing", folder,
                        time.perf_counter() - t0)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_is_held(folder: Path) -> bool:
    """Whether some process is building ``folder`` now."""
    lock = Path(folder) / LOCK_FILE
    if not lock.is_file():
        return False
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _allocate(path: Path, size: int) -> None:
    """Create or resize ``path`` to ``size`` bytes with its blocks reserved (no sparse holes to fault on)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)  # a file system without fallocate: sparse, as before
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------- the cache
class FeatureCache:
    """fp16 arrays ``name -> [n_rows, *shape]`` stored as memory maps under ``root/<key>/``, each row checksummed.

    ``repair``: optional ``rows -> None`` that recomputes, writes and marks rows (set by the builder); rows whose
    checksum fails on read are rebuilt through it (with a warning naming the file and the number of rows), or
    raise :class:`CacheError` without it.
    """

    mode = "stored"

    def __init__(self, root: str | Path, parts: dict, n_rows: int, shapes: dict[str, tuple[int, ...]],
                 rank: int = 0) -> None:
        self.dir = cache_folder(root, parts, n_rows, shapes)
        self.key = self.dir.name
        self.n_rows, self.shapes, self.rank = n_rows, {k: tuple(v) for k, v in shapes.items()}, rank
        self.repair: Callable[[np.ndarray], None] | None = None
        with disk_errors(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / META_FILE
        if not meta.is_file() and rank == 0:
            info = {"format": CACHE_FORMAT, "rows": n_rows, "shapes": self.shapes, "bytes": self.bytes,
                    "what": parts.get("what"), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "images": _images_summary(parts.get("images")),  # every path is in the key, not here
                    "parts": {k: v for k, v in parts.items() if k != "images"}}
            with disk_errors(self.dir):
                atomic_write_bytes(meta, json.dumps(info, default=str, indent=1).encode())
        self._done_file = self.dir / ("done.npy" if rank == 0 else f"done.rank{rank}.npy")
        self._mine: np.ndarray | None = None
        files = {}
        for name, shape in self.shapes.items():
            files[self.dir / f"{name}.f16"] = (n_rows * row_bytes(shape), row_bytes(shape))
            files[self.dir / f"{name}.crc32"] = (4 * n_rows, 4)
        lost = self._check_sizes(files)
        self.arrays = {name: np.memmap(self.dir / f"{name}.f16", dtype=np.float16, mode="r+", shape=(n_rows, *s))
                       for name, s in self.shapes.items()}
        self.checksums = {name: np.memmap(self.dir / f"{name}.crc32", dtype=np.uint32, mode="r+", shape=(n_rows,))
                          for name in self.shapes}
        self._verified = {name: np.zeros(n_rows, dtype=bool) for name in self.shapes}
        if len(lost):
            self.invalidate(lost)

    def _check_sizes(self, files: dict[Path, tuple[int, int]]) -> np.ndarray:
        """Create missing files (space checked and reserved first); a file of the wrong size is resized and the
        rows it lost are returned (to be rebuilt)."""
        lost: set[int] = set()
        missing = 0
        for f, (size, per_row) in files.items():
            actual = f.stat().st_size if f.is_file() else None
            if actual is None:
                missing += size
            elif actual != size:
                gone = range(min(actual // per_row, self.n_rows), self.n_rows)
                log.warning("cache file %s has %d bytes, expected %d (truncated or overwritten): %d row(s) "
                            "rebuilt", f, actual, size, len(gone))
                lost.update(gone)
                missing += max(0, size - actual)
        if missing:
            free = free_bytes(self.dir)
            if missing > free:
                raise CacheSpaceError(f"the frozen-activation cache needs {format_size(missing)} in {self.dir} but "
                                      f"only {format_size(free)} is free: free space there, move the cache "
                                      "(train.cache_dir or MEDBRIDGE_CACHE) or pick a smaller train.cache "
                                      "mode", self.dir, missing, free)
        for f, (size, _) in files.items():
            if not f.is_file() or f.stat().st_size != size:
                if self.rank != 0 and not f.is_file():
                    raise CacheError(f"{f}: missing (rank 0 creates the cache files before the other ranks open "
                                     "them)")
                with disk_errors(self.dir, missing):
                    _allocate(f, size)
        return np.array(sorted(lost), dtype=np.int64)

    @property
    def bytes(self) -> int:
        return cache_bytes(self.n_rows, self.shapes)

    def done(self) -> np.ndarray:
        return done_mask(self.dir, self.n_rows)

    def write(self, rows: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        rows = np.asarray(rows)
        for name, t in values.items():
            data = t.detach().to("cpu", torch.float16).numpy()
            self.arrays[name][rows] = data
            crc = self.checksums[name]
            for i, r in enumerate(rows):
                crc[r] = zlib.crc32(np.ascontiguousarray(data[i]))

    def _save_flags(self, path: Path, flags: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, flags)
        with disk_errors(self.dir):
            atomic_write_bytes(path, buf.getvalue())

    def mark_done(self, rows: np.ndarray) -> None:
        with disk_errors(self.dir):
            for name in self.shapes:
                self.arrays[name].flush()
                self.checksums[name].flush()
        if self._mine is None:  # this process's flags, read once and kept
            self._mine = np.load(self._done_file) if self._done_file.is_file() else np.zeros(self.n_rows, dtype=bool)
        self._mine[rows] = True
        for v in self._verified.values():
            v[rows] = True  # written by this process: their checksums were just computed from the data
        self._save_flags(self._done_file, self._mine)

    def invalidate(self, rows: np.ndarray) -> None:
        """Unmark ``rows`` in every rank's done flags (they will be rebuilt)."""
        rows = np.asarray(rows)
        for f in self.dir.glob("done*.npy"):
            try:
                flags = np.load(f)
            except (OSError, ValueError):
                continue
            if flags.shape == (self.n_rows,) and flags[rows].any():
                flags[rows] = False
                self._save_flags(f, flags)
        if self._mine is not None:
            self._mine[rows] = False
        for v in self._verified.values():
            v[rows] = False

    def damaged_rows(self, rows: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Per array, the rows among ``rows`` whose data no longer matches its checksum (reads them all)."""
        out = {}
        for name in names or list(self.shapes):
            data, crc = self.arrays[name], self.checksums[name]
            bad = [r for r in np.asarray(rows) if zlib.crc32(data[r]) != crc[r]]
            if bad:
                out[name] = np.array(bad)
        return out

    def read(self, rows: np.ndarray, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Rows of the arrays in ``names`` (default all) as fp16 tensors; rows read for the first time in this
        process are checked against their checksums (see the class doc for what happens to damaged ones)."""
        rows = np.asarray(rows)
        order = np.argsort(rows)
        inv = np.empty_like(order)
        inv[order] = np.arange(len(rows))
        sorted_rows = rows[order]
        out, damaged = {}, {}
        for name, a in self.arrays.items():
            if names is not None and name not in names:
                continue
            data = a[sorted_rows]  # a copy: verified below, before anyone sees it
            seen = self._verified[name]
            crc = self.checksums[name]
            bad = [i for i in np.flatnonzero(~seen[sorted_rows]) if zlib.crc32(data[i]) != crc[sorted_rows[i]]]
            if bad:
                damaged[name] = np.unique(sorted_rows[bad])
            seen[sorted_rows] = True
            out[name] = data
        if damaged:
            bad_rows = np.unique(np.concatenate(list(damaged.values())))
            for name, r in damaged.items():
                log.warning("cache file %s: %d row(s) fail their checksum (damaged on disk)%s", self.dir /
                            f"{name}.f16", len(r), ": rebuilding them" if self.repair else "")
            self.invalidate(bad_rows)
            if self.repair is None:
                raise CacheError(f"cache {self.dir}: {len(bad_rows)} row(s) damaged on disk (checksum mismatch in "
                                 f"{', '.join(sorted(damaged))}); run the command again to rebuild them, or "
                                 f"remove the cache with `medbridge cache rm {self.key}`")
            self.repair(bad_rows)
            fresh = self.read(bad_rows, list(out))
            for j, r in enumerate(bad_rows):
                hit = sorted_rows == r
                for name in out:
                    out[name][hit] = fresh[name][j].numpy()
        return {name: torch.from_numpy(np.ascontiguousarray(d[inv])) for name, d in out.items()}


def _images_summary(images) -> dict | None:
    """Where a cache's images come from, for ``medbridge cache ls`` (the key has every path)."""
    if not images:
        return None
    paths = [str(i[0]) for i in images]
    try:
        common = os.path.commonpath(paths)
    except ValueError:
        common = ""
    return {"n": len(paths), "folder": common}


KEY_PATTERN = re.compile(r"[0-9a-f]{20}")  # cache_key(): 20 hex digits


def cache_meta(folder: Path) -> dict | None:
    """The ``meta.json`` of a folder medbridge made as a cache, else None: a real folder (not a link) named like a
    cache key, holding the JSON object :class:`FeatureCache` writes first (``format`` ``medbridge-cache/N``)."""
    if folder.is_symlink() or not folder.is_dir() or not KEY_PATTERN.fullmatch(folder.name):
        return None
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and str(meta.get("format", "")).startswith("medbridge-cache/")
    return meta if ok else None


def list_caches(root: str | Path, others: list[Path] | None = None) -> list[dict]:
    """Every cache folder under ``root``: key, what it stores, rows done / total, bytes on disk, last use.
    Anything else there (folders medbridge did not make, symbolic links) is left out, and appended to
    ``others`` when given."""
    out = []
    root = Path(root)
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        meta = cache_meta(d)
        if meta is None:
            if others is not None and (d.is_dir() or d.is_symlink()):
                others.append(d)
            continue
        info = {"key": d.name, "path": str(d), "on_disk": on_disk_bytes(d), "what": None, "rows": None,
                "done": None, "format": None, "images": None, "in_use": lock_is_held(d)}
        files = [f for f in d.iterdir() if f.is_file()]
        info["last_used"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(max((f.stat().st_mtime for f in files),
                                                                              default=d.stat().st_mtime)))
        info.update(format=meta.get("format"), rows=meta.get("rows"),
                    what=meta.get("what") or (meta.get("parts") or {}).get("what"),
                    images=meta.get("images") or _images_summary((meta.get("parts") or {}).get("images")))
        if isinstance(info["rows"], int):
            info["done"] = int(done_mask(d, info["rows"]).sum())
        out.append(info)
    return out


def remove_cache(folder: Path) -> int:
    """Delete one cache folder that medbridge made (refused for anything else, and while a build holds its lock);
    returns the bytes freed."""
    folder = Path(folder)
    if cache_meta(folder) is None:
        raise CacheError(f"{folder} is not a medbridge cache (no {META_FILE} of format medbridge-cache/N, or a "
                         "symbolic link): left alone")
    if lock_is_held(folder):
        raise CacheError(f"cache {folder} is being built by another process; remove it once that run is over")
    size = on_disk_bytes(folder)
    shutil.rmtree(folder)
    return size
