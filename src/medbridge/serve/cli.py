"""``medbridge serve RUN``: the prediction service and its page (uvicorn)."""

from __future__ import annotations

import argparse
import os

from ..cli.options import add_shared_options

ENV_PREFIX = "MEDBRIDGE_SERVE_"


def add_serve_command(sub) -> None:
    p = sub.add_parser("serve", help="prediction service + web page for a trained method (FastAPI/uvicorn)",
                       description="Serve a trained method: the page at /, POST /v1/predict, GET /v1/model, "
                                   "GET /healthz, OpenAPI docs at /docs. Binds 127.0.0.1 unless told otherwise; "
                                   "another address needs --token (bearer token checked on every /v1 call).",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  medbridge serve runs/demo-x\n"
                              "  medbridge serve runs/demo-x/linear_probe --port 8080\n"
                              "  medbridge serve runs/demo-x --host 0.0.0.0 --token \"$(openssl rand -hex 24)\"")
    p.add_argument("run", help="run folder, adapter folder, linear-probe or baseline folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get(ENV_PREFIX + "TOKEN"),
                   help=f"bearer token for /v1 (default: ${ENV_PREFIX}TOKEN); required off loopback")
    p.add_argument("--server-workers", "--workers", dest="server_workers", type=int, default=1,
                   help="server processes, each with its own model copy (--workers: its former name)")
    p.add_argument("--max-upload-mb", type=float, default=64, help="largest request body (default: %(default)s)")
    p.add_argument("--max-megapixels", type=float, default=40, help="largest decoded image (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=16, help="images per model call (micro-batching)")
    p.add_argument("--max-pending", type=int, default=64, help="images allowed to wait; beyond: 503")
    add_shared_options(p, device=True, workers=False)
    p.set_defaults(func=cmd_serve)


def _settings(args: argparse.Namespace) -> dict:
    return {"RUN": args.run, "HOST": args.host, "TOKEN": args.token or "", "MAX_BYTES": str(int(args.max_upload_mb
            * 1024 * 1024)), "MAX_PIXELS": str(int(args.max_megapixels * 1e6)), "MAX_BATCH": str(args.max_batch),
            "MAX_PENDING": str(args.max_pending), "DEVICE": args.device or "auto"}


def app_from_env():
    """The app a uvicorn worker process builds from ``MEDBRIDGE_SERVE_*`` (``--server-workers`` > 1)."""
    from .app import create_app
    from .decode import UploadLimits

    env = {k: os.environ.get(ENV_PREFIX + k, "") for k in ("RUN", "HOST", "TOKEN", "MAX_BYTES", "MAX_PIXELS",
                                                            "MAX_BATCH", "MAX_PENDING", "DEVICE")}
    limits = UploadLimits(max_bytes=int(env["MAX_BYTES"]), max_pixels=int(env["MAX_PIXELS"]))
    return create_app(env["RUN"], env["TOKEN"] or None, host=env["HOST"], limits=limits,
                      max_batch=int(env["MAX_BATCH"]), max_pending=int(env["MAX_PENDING"]),
                      device=env["DEVICE"] or "auto")


def cmd_serve(args: argparse.Namespace) -> int:
    from ..extras import require

    uvicorn = require("fastapi", "python_multipart", "fastapi_offline", "uvicorn")

    from .app import check_bind

    if args.server_workers < 1 or args.port < 0 or args.max_batch < 1 or args.max_pending < 1:
        raise ValueError("--server-workers, --max-batch and --max-pending must be >= 1, --port >= 0")
    for option, value in (("--max-upload-mb", args.max_upload_mb), ("--max-megapixels", args.max_megapixels)):
        if not value > 0 or value == float("inf"):  # NaN fails both
            raise ValueError(f"{option} must be a number > 0, got {value}")
    check_bind(args.host, args.token)
    os.environ.update({ENV_PREFIX + k: v for k, v in _settings(args).items()})
    level = "info" if args.verbose else "warning"
    print(f"medbridge serve: {args.run} on http://{args.host}:{args.port}/ (API docs: /docs)", flush=True)
    if args.server_workers == 1:
        uvicorn.run(app_from_env(), host=args.host, port=args.port, log_level=level)
    else:
        uvicorn.run("medbridge.serve.cli:app_from_env", factory=True, host=args.host, port=args.port,
                    workers=args.server_workers, log_level=level)
    return 0
