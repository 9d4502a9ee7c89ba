"""The ``medbridge`` command line. ``main(argv)`` is callable from tests and returns the exit code."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from collections.abc import Sequence

from ..defaults import DEFAULT_BACKBONE, list_presets
from ..version import PROGRAM, __version__
from .options import add_shared_options, apply_shared_options
from .run_commands import SHARED_SAMPLE, add_run_commands


def _fmt(values) -> str:
    return "-" if values is None else "/".join(f"{v:.3g}" for v in values)


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        return list_methods_table(args.json)
    if args.what == "datasets":
        from ..data.datasets.registry import datasets_table

        print(datasets_table(args.json))
        return 0
    return list_backbones_table(args.json)


def list_backbones_table(as_json: bool) -> int:
    """``medbridge list backbones``: the registry's backbones (family, hub id, licence, text tower, offline?), then
    the source forms and families that build unregistered models."""
    from ..backbones import availability, list_backbone_families, list_backbones
    from ..backbones.source import SOURCE_FORMS

    rows = []
    for s in list_backbones():
        rows.append({
            "name": s.name, "family": s.family, "source": s.source, "hub": s.hub_repo,
            "width": s.vision_width, "depth": s.depth, "input": s.image_size,
            "mean": _fmt(s.mean), "std": _fmt(s.std), "text": "yes" if s.has_text else "no",
            "aligned": "yes" if s.aligned else "no", "licence": s.licence or None,
            "offline": availability(s), "description": s.description,
        })
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["name", "family", "width", "depth", "input", "mean", "std", "text", "aligned", "offline", "licence",
            "source"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c] if r[c] is not None else "-").ljust(widths[c]) for c in cols))
    print(f"\ndefault: {DEFAULT_BACKBONE}.  Source forms: " + ", ".join(form for form, _, _ in SOURCE_FORMS) + ".")
    print("families: " + "; ".join(f"{f.name} ({f.help})" for f in list_backbone_families())
          + ".  Add one: docs/adding-a-backbone.md.")
    return 0


def list_methods_table(as_json: bool) -> int:
    """``medbridge list methods``: the registry's methods with their group, options and description."""
    from ..methods.api import CAPABILITIES, describe_options
    from ..methods.registry import get_method, list_methods

    rows = []
    for name in list_methods():
        e = get_method(name)
        rows.append({"name": name, "group": e.group or "-", "folder": e.method_class.folder(),
                     "text_prompted": e.method_class.text_prompted, "capabilities": [
                         c.__name__ for c in CAPABILITIES if issubclass(e.method_class, c)],
                     "description": e.description,
                     "options": describe_options(e.options_class)})
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name'].ljust(width)}  {r['group']:<8}  {r['description']}")
        print(" " * (width + 12) + "options: " + ", ".join(f"{o['name']}={o['default']!r}" for o in r["options"]))
    print("\nSet options with --set method_options.NAME.OPTION=VALUE (or method_options.baseline.OPTION for every "
          "baseline); add your own method with medbridge.register_method (docs/adding-a-method.md).")
    return 0


def cmd_check_backbone(args: argparse.Namespace) -> int:
    from ..engine.backbone_check import embedding_sanity_check

    report = embedding_sanity_check(args.backbone, args.data)
    print(json.dumps(report, indent=1) if args.json else report["summary"])
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Adapt frozen foundation vision(-language) models to multi-label medical image classification.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  medbridge demo\n  medbridge train --data /data/nih --out runs/nih\n"
               "  medbridge eval runs/nih --data /data/nih --json\n  medbridge predict runs/nih image.dcm\n"
               "  medbridge list backbones",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered components",
                       description="List registered backbones (family, source, widths, input size, mean/std, text "
                                   "tower and whether it is aligned, offline availability, licence), methods "
                                   "(group, options with defaults) or dataset formats (expected files, default "
                                   "preset, citation).",
                       epilog="examples:\n  medbridge list backbones --json\n  medbridge list methods\n"
                              "  medbridge list datasets")
    p.add_argument("what", choices=["backbones", "datasets", "methods"], help="what to list")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_shared_options(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check-backbone", help="sanity-check a backbone's embeddings on real X-rays",
                       description="Embed real chest X-rays and label phrases with a backbone and check that "
                                   "similarities make sense (augmented copy closer than another patient; "
                                   "synonymous findings closer than unrelated ones).",
                       epilog=f"example: medbridge check-backbone --data {SHARED_SAMPLE}")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone name or source string")
    p.add_argument("--data", default=SHARED_SAMPLE, help="folder with NIH-style images/ (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    add_shared_options(p)
    p.set_defaults(func=cmd_check_backbone)

    add_run_commands(sub, list_presets())
    from .cache_commands import add_cache_command

    add_cache_command(sub)
    from ..serve.cli import add_serve_command

    add_serve_command(sub)
    return parser


def error_message(exc: BaseException) -> str:
    """The user-facing text of an error; errors re-raised from DataLoader workers carry the worker's traceback in
    their message: only its last line (the original error) is kept."""
    text = str(exc) or type(exc).__name__
    if "DataLoader worker" in text and "Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        text = f"no space left on the device{where}: free disk space or point the output/cache elsewhere"
    elif isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {exc.strerror or text}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..engine import model_card

    model_card.COMMAND = [PROGRAM, *(sys.argv[1:] if argv is None else argv)]  # for the run's report.md
    apply_shared_options(args)
    try:
        if os.environ.get("MEDBRIDGE_PLUGINS", "").strip():  # after parsing: --help/--version never run plugins
            from ..methods.registry import list_methods

            list_methods()  # loads the built-in methods, then the plugins (errors: one line, exit 2)
        return int(args.func(args) or 0)
    except (OSError, ValueError, RuntimeError) as exc:  # user errors: bad input, files, configs, backbones
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"medbridge: error: {error_message(exc)}", file=sys.stderr)
        if not getattr(args, "verbose", False) and _is_unexpected(exc):
            print("(run with -v for the traceback)", file=sys.stderr)
        return 2


def _is_unexpected(exc: BaseException) -> bool:
    """Errors that are not medbridge's own messages (a library's RuntimeError, say) get a hint about -v."""
    return type(exc).__module__.split(".")[0] not in (PROGRAM, "builtins")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
