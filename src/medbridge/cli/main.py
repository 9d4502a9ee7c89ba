"""The ``medbridge`` command line. ``main(argv)`` is callable from tests and returns the exit code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ..backbones import DEFAULT_BACKBONE, BackboneError, availability, list_backbones
from .run_commands import SHARED_SAMPLE, add_run_commands


def _fmt(values) -> str:
    return "-" if values is None else "/".join(f"{v:.3g}" for v in values)


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for s in list_backbones():
        rows.append({
            "name": s.name, "family": s.family, "source": s.source,
            "width": s.vision_width, "depth": s.depth, "input": s.image_size,
            "mean": _fmt(s.mean), "std": _fmt(s.std), "text": "yes" if s.has_text else "no",
            "offline": availability(s), "description": s.description,
        })
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["name", "family", "width", "depth", "input", "mean", "std", "text", "offline", "source"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c] if r[c] is not None else "-").ljust(widths[c]) for c in cols))
    print(f"\ndefault: {DEFAULT_BACKBONE}.  Also accepted: NAME@/path/to/checkpoint.pt, hf-hub:org/repo, "
          "local-dir:/path, VISION+TEXT.")
    return 0


def cmd_check_backbone(args: argparse.Namespace) -> int:
    from ..backbones.check import embedding_sanity_check

    report = embedding_sanity_check(args.backbone, args.data)
    print(json.dumps(report, indent=1) if args.json else report["summary"])
    return 0 if report["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medbridge",
        description="Adapt frozen foundation vision(-language) models to multi-label medical image classification.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  medbridge demo\n  medbridge train --data /data/nih --out runs/nih\n"
               "  medbridge eval runs/nih --data /data/nih --json\n  medbridge predict runs/nih image.dcm\n"
               "  medbridge list backbones",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered components",
                       description="List registered backbones with source, widths, input size, mean/std, "
                                   "text tower and whether their weights are usable offline right now.",
                       epilog="example: medbridge list backbones --json")
    p.add_argument("what", choices=["backbones"], help="what to list")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check-backbone", help="sanity-check a backbone's embeddings on real X-rays",
                       description="Embed real chest X-rays and label phrases with a backbone and check that "
                                   "similarities make sense (augmented copy closer than another patient; "
                                   "synonymous findings closer than unrelated ones).",
                       epilog=f"example: medbridge check-backbone --data {SHARED_SAMPLE}")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="backbone name or source string")
    p.add_argument("--data", default=SHARED_SAMPLE, help="folder with NIH-style images/ (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_check_backbone)

    from ..engine.config import list_presets

    add_run_commands(sub, list_presets())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (BackboneError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"medbridge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
