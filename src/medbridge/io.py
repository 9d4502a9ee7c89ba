"""Files medbridge writes and reads back: atomic writes, JSON that names its file, weight files with digests.

Every saved method (adapter, probe, baseline) stores ``weights_sha256`` (a digest of its tensors' names, dtypes,
shapes and bytes) in its JSON; loading recomputes it, so a flipped bit or a swapped file is an error, not a silent
change of probabilities. Files saved before digests existed load without the check."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["CorruptFileError", "atomic_write_bytes", "cache_dir", "read_json", "tensor_digest", "save_tensors",
           "load_tensors", "check_finite", "load_torch_checkpoint"]


def cache_dir() -> Path:
    """medbridge's cache root: ``$MEDBRIDGE_CACHE`` or the user cache dir (never site-packages). Converted
    weights live in it, frozen-activation caches in its ``features/`` folder."""
    env = os.environ.get("MEDBRIDGE_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("medbridge"))


def _umask() -> int:
    """The process umask (read by setting and restoring it; there is no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename. The file gets the
    permissions a plain ``open(path, "w")`` would (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno and not exc.filename:  # e.g. ENOSPC from write(): name the file
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


class CorruptFileError(ValueError):
    """A file medbridge wrote (or was given) is damaged, truncated, of another kind, or fails its digest."""


def read_json(path: str | Path, what: str = "JSON file") -> dict:
    """``json.loads`` of a file; missing, unreadable or invalid files raise errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path}: not a text {what} ({exc.reason} at byte {exc.start})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"{path}: invalid {what}: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` as safetensors atomically; returns their digest (to store in the method's JSON)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), save(tensors))
    return tensor_digest(tensors)


def load_tensors(path: str | Path, digest: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle); damaged files and digest mismatches raise CorruptFileError."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weight file missing")
    try:
        tensors = load(path.read_bytes())
    except Exception as exc:  # SafetensorError, invalid header, a pickle renamed .safetensors, truncation, ...
        raise CorruptFileError(f"{path}: not a readable safetensors file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); it is damaged "
                               "or not a medbridge weight file: retrain or restore it") from exc
    if digest is not None and tensor_digest(tensors) != digest:
        raise CorruptFileError(f"{path}: the weights do not match the digest recorded when they were saved "
                               "(weights_sha256 in the JSON beside them): the file was modified or damaged")
    return tensors


def check_finite(scores: np.ndarray, what: str) -> np.ndarray:
    """Scores with NaN/inf are an error (never written as empty cells or ``NaN`` metrics)."""
    scores = np.asarray(scores)
    bad = ~np.isfinite(scores)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=tuple(range(1, scores.ndim))) if scores.ndim > 1 else bad)
        raise CorruptFileError(f"{what}: {int(bad.sum())} non-finite score(s) (NaN/inf) in {len(rows)} row(s), "
                               f"first rows {rows[:5].tolist()}: the weights or inputs are damaged")
    return scores


def unsafe_load_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line and without torch's advice to retry with
    ``weights_only=False`` (which would execute the pickle)."""
    first = str(exc).splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    if "weights_only" in first or "Weights only" in first or "unpickl" in first.lower():
        return "it holds objects other than tensors and plain containers, which are never unpickled"
    return first


def load_torch_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and never advise unsafe loading."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = unsafe_load_reason(exc)
        raise CorruptFileError(f"{path}: not a medbridge checkpoint that can be read safely ({first}); delete it "
                               "to restart training from scratch") from exc
