"""The options every verb shares, declared once and applied the same way: verbosity (``-v``, ``--quiet``), where to
compute (``--device``, ``--workers``) and, for verbs that build a run config, ``--set`` and ``--n-boot``.

:func:`add_shared_options` adds them to a verb's parser; :func:`apply_shared_options` (called by ``main`` for
every verb) sets up logging; :func:`config_overrides` turns them into the run-config overrides they stand for
(``--n-boot N`` is ``eval.n_boot=N``, ``--device`` / ``--workers`` are ``train.device`` / ``train.workers``)."""

from __future__ import annotations

import argparse
import logging
import warnings


def _count(text: str) -> int:
    """An integer >= 0 (argparse type: the error names the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_shared_options(p: argparse.ArgumentParser, *, device: bool = False, workers: bool = True,
                       config: bool = False, n_boot: bool = False) -> None:
    """``-v/--verbose`` and ``--quiet`` on every verb; ``device``: ``--device`` and (``workers``) ``--workers``;
    ``config``: ``--set``; ``n_boot``: ``--n-boot``. One help text and one meaning per option everywhere."""
    p.add_argument("-v", "--verbose", action="store_true", help="log more (and the traceback of an error)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if device:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: CUDA when present)")
        if workers:
            p.add_argument("--workers", type=_count, default=None,
                           help="image-decoding worker processes (default: the command's: cores - 1, at most 8, "
                                "or train.workers)")
    if config:
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="config override, e.g. train.lr=1e-3, method_options.medbridge.num_queries=16, "
                            "data.label_fraction=0.1")
    if n_boot:
        p.add_argument("--n-boot", type=_count, metavar="N",
                       help="patient-bootstrap resamples per 95%% interval (eval.n_boot; default 1000; 0: none)")


def apply_shared_options(args: argparse.Namespace) -> None:
    """What the shared options do before any verb runs: logging level by ``-v``, and medbridge 0.1 config keys
    reported (their DeprecationWarning names the new key)."""
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    warnings.filterwarnings("default", message="config key .* is a medbridge 0.1 key", category=DeprecationWarning)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The run-config overrides the shared options stand for, before the verb's ``--set`` ones (which win)."""
    out = []
    if getattr(args, "device", None) is not None:
        out.append(f"train.device={args.device}")
    if getattr(args, "workers", None) is not None:
        out.append(f"train.workers={args.workers}")
    if getattr(args, "n_boot", None) is not None:
        out.append(f"eval.n_boot={args.n_boot}")
    return out + list(getattr(args, "set", None) or [])


__all__ = ["add_shared_options", "apply_shared_options", "config_overrides"]
