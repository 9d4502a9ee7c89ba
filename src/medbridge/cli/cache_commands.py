"""``medbridge cache ls / rm``: the frozen-activation caches on disk, their sizes, and freeing them."""

from __future__ import annotations

import argparse
import json
import sys

from .options import add_shared_options


def _root(args: argparse.Namespace):
    from ..engine.features import cache_root_from

    return cache_root_from(args.cache_dir)


def cmd_cache_ls(args: argparse.Namespace) -> int:
    from ..engine.cache import format_size, free_bytes, list_caches

    root = _root(args)
    caches = list_caches(root)
    if args.json:
        print(json.dumps({"root": str(root), "free": free_bytes(root), "caches": caches}, indent=1))
        return 0
    if not caches:
        print(f"no frozen-activation caches in {root} ({format_size(free_bytes(root))} free)")
        return 0
    rows = [["key", "stores", "rows done", "on disk", "last used", "images"]]
    for c in caches:
        done = f"{c['done']}/{c['rows']}" if c["rows"] is not None else "?"
        images = c["images"] or {}
        where = f"{images.get('n', '?')} in {images.get('folder') or '?'}" if images else "?"
        state = " (building)" if c["in_use"] else "" if c["format"] == "medbridge-cache/2" else " (old format)"
        rows.append([c["key"], f"{c['what'] or '?'}{state}", done, format_size(c["on_disk"]), c["last_used"],
                     where])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    total = sum(c["on_disk"] for c in caches)
    print(f"\n{len(caches)} cache(s), {format_size(total)} in {root}; {format_size(free_bytes(root))} free. "
          "Free one with: medbridge cache rm KEY")
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    """Remove caches by key, unique key prefix or ``--all``; only folders medbridge made as caches (its
    ``meta.json`` marker) are ever candidates. With several, a failure is reported and the others still go."""
    from ..engine.cache import CacheError, format_size, list_caches, remove_cache

    root = _root(args)
    others: list = []
    caches = list_caches(root, others)
    for other in others:
        kind = "symbolic link" if other.is_symlink() else "folder"
        print(f"skipped {other.name}: a {kind} medbridge did not make as a cache", file=sys.stderr)
    if args.all:
        chosen = caches
    else:
        if not args.keys:
            raise CacheError("cache rm: name the cache key(s) to remove (see `medbridge cache ls`) or pass --all")
        chosen = []
        for key in args.keys:
            hits = [c for c in caches if c["key"].startswith(key)]
            if len(hits) != 1:
                raise CacheError(f"cache rm: {key!r} matches {len(hits)} caches in {root} (expected exactly one; "
                                 "see `medbridge cache ls`)")
            chosen += hits
    freed, failed = 0, []
    for c in chosen:
        try:
            size = remove_cache(c["path"])
        except (CacheError, OSError) as exc:  # one failure must not leave the rest of --all undone
            failed.append(c["key"])
            print(f"not removed {c['key']}: {exc}", file=sys.stderr)
            continue
        freed += size
        print(f"removed {c['key']} ({c['what'] or '?'}, {format_size(size)})")
    print(f"freed {format_size(freed)} in {root}")
    if failed:
        raise CacheError(f"cache rm: {len(failed)} cache(s) not removed ({', '.join(failed)}); see above")
    return 0


def add_cache_command(sub) -> None:
    """Register ``medbridge cache {ls,rm}``."""
    p = sub.add_parser("cache", help="list or remove frozen-activation caches",
                       description="Frozen-activation caches (one folder per backbone / view config / image set) "
                                   "with their sizes; remove the ones you no longer need.",
                       epilog="examples:\n  medbridge cache ls\n  medbridge cache rm 3f2a9c\n"
                              "  medbridge cache rm --all --cache-dir /scratch/medbridge-cache",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="cache_action", required=True)
    for name, func, text in (("ls", cmd_cache_ls, "list caches with their sizes"),
                             ("rm", cmd_cache_rm, "remove caches (by key or key prefix)")):
        a = actions.add_parser(name, help=text, description=text)
        a.add_argument("--cache-dir", help="cache root (default: $MEDBRIDGE_CACHE/features or "
                                           "~/.cache/medbridge/features)")
        if name == "ls":
            a.add_argument("--json", action="store_true", help="print JSON")
        else:
            a.add_argument("keys", nargs="*", help="cache keys or unique key prefixes (from `medbridge cache ls`)")
            a.add_argument("--all", action="store_true", help="remove every cache under the root")
        add_shared_options(a)
        a.set_defaults(func=func)
