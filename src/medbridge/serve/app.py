"""The ASGI app: ``create_app(run_or_adapter)`` -> FastAPI with the page at ``/``, ``POST /v1/predict``,
``GET /v1/model``, ``GET /healthz`` and OpenAPI docs at ``/docs`` (assets served locally, no CDN).

Uploads are read into memory with a byte cap and parsed here (never spooled to a temporary file, which
Starlette's form parser does above 1 MiB), sniffed by content and decoded by :mod:`medbridge.serve.decode`.
Every client error is a 4xx JSON ``{"error": ...}``; an unexpected failure is a 500 JSON without a traceback.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..version import PROGRAM
from .decode import UploadError, UploadLimits, decode_upload
from .explain import DEFAULT_LAYER
from .limits import RequestBudget, allowed_hosts, check_explain_count, host_allowed
from .predictor import Job, MicroBatcher, Predictor, QueueFull, parse_explain

log = logging.getLogger(__name__)
STATIC = Path(str(resources.files("medbridge.serve") / "static"))
FILE_FIELDS = ("files", "file")
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                           "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Binding beyond loopback without a token is refused (anyone on the network could use the model)."""
    if not is_loopback(host) and not token:
        raise ValueError(f"--host {host} is reachable from other machines: pass --token (a long random secret that "
                         "clients send as 'Authorization: Bearer TOKEN'), or bind 127.0.0.1")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or received)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise UploadError("invalid Content-Length header", status=400)
        if int(declared) > limit:
            raise UploadError(f"request body of {int(declared):,} bytes exceeds the limit of {limit:,} bytes",
                              status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise UploadError(f"request body exceeds the limit of {limit:,} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_multipart(body: bytes, content_type: str, max_images: int) -> list[tuple[str, bytes]]:
    """multipart/form-data body -> [(name, bytes)] of the file parts (field ``files`` or ``file``), in memory."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError("multipart/form-data without a boundary", status=400)
    parts: list[dict] = []
    header: dict = {"field": b"", "value": b""}
    ended: list[bool] = []

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header["field"].lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_end": lambda: ended.append(True)})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:
        raise UploadError(f"malformed multipart body ({type(exc).__name__})", status=400) from exc
    if not ended:
        raise UploadError("malformed multipart body: it ends without the closing boundary (truncated upload?)",
                          status=400)
    files = []
    for i, part in enumerate(parts):
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        field = disp.get(b"name", b"").decode("utf-8", "replace")
        if field not in FILE_FIELDS:
            raise UploadError(f"part {i + 1}: unexpected form field {field!r} (send images as 'files')", status=400)
        filename = disp.get(b"filename", b"").decode("utf-8", "replace") or f"image {len(files) + 1}"
        files.append((filename, b"".join(part["data"])))
    if not files:
        raise UploadError("no image in the request (send multipart/form-data with one or more 'files' parts, or "
                          "the image itself as the body)", status=400)
    if len(files) > max_images:
        raise UploadError(f"{len(files)} images in one request; the limit is {max_images}", status=413)
    return files


PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                      "description": "one or more images: PNG (8/16-bit), JPEG or DICOM"}}}},
        "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
    },
}


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return _error(500, "internal error while handling the request (the server log names its type)")


def create_app(run_or_adapter: str | Path | Predictor, token: str | None = None, *, host: str = "127.0.0.1",
               limits: UploadLimits | None = None, max_batch: int = 16, max_wait_s: float = 0.005,
               max_pending: int = 64, explain_layer: int | None = DEFAULT_LAYER, device: str = "cpu") -> FastAPI:
    """The service for one saved method (run folder, adapter/probe/baseline folder, or a loaded
    :class:`Predictor`). ``token``: bearer token required on every ``/v1`` call (mandatory when ``host`` is not a
    loopback address). ``limits``: bytes per request, pixels per image, images per request."""
    from fastapi_offline import FastAPIOffline

    check_bind(host, token)
    limits = limits or UploadLimits()
    predictor = (run_or_adapter if isinstance(run_or_adapter, Predictor)
                 else Predictor(run_or_adapter, explain_layer=explain_layer, device=device))
    batcher = MicroBatcher(predictor.predict, max_batch=max_batch, max_wait_s=max_wait_s, max_pending=max_pending)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPIOffline(title=PROGRAM, version="1", static_url="/docs-assets", lifespan=lifespan,
                         description=f"Multi-label predictions of a trained {predictor.method.name} adapter, with "
                                     "per-label heat maps. Send images to POST /v1/predict.")
    app.state.predictor, app.state.batcher = predictor, batcher
    expected = token.encode() if token else None
    hosts = allowed_hosts(host, token)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Host names other than the bound ones are refused (DNS rebinding); an unexpected failure is logged by its
        type only (no traceback: the request's data never reaches the log) and answered 500."""
        if not host_allowed(request.headers.get("host"), hosts):
            return _error(400, f"Host header not accepted: this server answers to {', '.join(hosts)} (bound to "
                               f"{host}; a server for other names needs --token)")
        try:
            return await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the 500 answer below
            return internal_error(request, exc)

    async def require_token(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(401, "missing or wrong bearer token (send 'Authorization: Bearer TOKEN')",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return _error(422, f"invalid request: {where}")

    @app.exception_handler(QueueFull)
    async def busy(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request, exc)

    @app.get("/healthz", tags=["service"], summary="liveness: the model is loaded")
    async def healthz() -> dict:
        return {"status": "ok", "method": predictor.method.name}

    @app.get("/v1/model", tags=["model"], dependencies=[Depends(require_token)],
             summary="labels, backbones, method, training data and metrics of the served model")
    async def model_info() -> dict:
        return {**predictor.info, "limits": dict(vars(limits)),
                "service": {**batcher.stats, "pending": batcher.pending, "max_batch": batcher.max_batch,
                            "max_pending": batcher.max_pending}}

    @app.post("/v1/predict", tags=["model"], dependencies=[Depends(require_token)], openapi_extra={
        "requestBody": PREDICT_BODY}, summary="probabilities, thresholds and decisions (and heat maps) per image")
    async def predict(request: Request, explain: str = "none", preview: bool = False) -> dict:
        """Send one or several images as multipart/form-data parts named ``files`` (or one image as the raw body).
        Per image: each label's probability, the run's validation threshold and the decision; for MedBridge the
        expert gate and the views' boxes with their votes. ``explain``: heat maps (greyscale PNG data URLs,
        relevance scaled to each label's maximum; gradient x activation) for ``all`` labels, the ``topK`` most
        probable (``top`` = 3), or comma-separated label names; ``none`` by default (each map costs about one
        forward and backward pass); with ``preview=true`` the
        decoded image as a JPEG data URL (what the page shows, DICOM included)."""
        try:
            explain_spec = parse_explain(explain, predictor.method.labels)
        except ValueError as exc:
            raise UploadError(str(exc), status=422) from exc
        body = await read_body(request, limits.max_bytes)
        content_type = request.headers.get("content-type", "")
        if content_type.lower().startswith("multipart/form-data"):
            files = parse_multipart(body, content_type, limits.max_images)
        else:
            if not body:
                raise UploadError("empty request: send the image as the body, or multipart/form-data with one or "
                                  "more 'files' parts", status=400)
            files = [("body", body)]
        check_explain_count(explain_spec, len(files), len(predictor.method.labels), limits)
        budget, focal = RequestBudget(limits), predictor.method.focal
        for name, data in files:  # every image's header against the request's limits before any is decoded
            await run_in_threadpool(decode_upload, data, name, limits, focal, budget, True)
        images = []
        for name, data in files:
            images.append(await run_in_threadpool(decode_upload, data, name, limits, focal))
        results = await batcher.submit([Job(img, name, explain_spec, preview) for img, (name, _) in zip(images, files)])
        return {"method": predictor.method.name, "results": results}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    return app
