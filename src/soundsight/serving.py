"""Serving a trained model over HTTP: a JSON API and a page to try it in a browser.

``create_app(classifier, settings)`` builds the FastAPI app; :func:`serve` loads a model
file once and runs the app under uvicorn (``soundsight serve MODEL``).

Endpoints: ``POST /predict`` (multipart upload in field ``file``, or the raw audio as the
request body), ``GET /labels``, ``GET /health``, the OpenAPI docs at ``/docs`` and the
page at ``/`` (a single HTML file with its script inline: nothing is fetched from
elsewhere, so it works offline).

Resources stay bounded: a request is admitted to the queue *before* its body is read,
and refused with 503 when ``workers + queue_size`` requests are already admitted, so at
most that many uploads (each at most ``max_upload_bytes``, 413 past it) are held at once.
Decoding and inference run off the event loop in a fixed pool of ``workers`` threads.

Requests are scored one clip at a time, not batched across requests: a clip is already
a batch of sliding windows (10 for 5 s), and batching 2-8 clips together measured no
lower CPU time per clip on this project's 2-core CPU machines.
"""

import asyncio
import base64
import io
import ipaddress
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import soundfile as sf
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from .audio import AudioError, decode_bytes
from .errors import ConfigError
from .images import spectrogram_image
from .prediction import Classifier

#: Largest multipart envelope (boundaries, part headers) allowed on top of the file.
MULTIPART_OVERHEAD = 64 * 1024
#: Name of the multipart field that holds the upload.
UPLOAD_FIELD = "file"
STATIC = resources.files("soundsight") / "static"


@dataclass(frozen=True)
class ServeConfig:
    """Limits and defaults of the HTTP service.

    Attributes
    ----------
    max_upload_bytes : int
        Largest accepted upload (413 above it). Default 20 MB.
    max_duration : float
        Longer clips are analysed up to this many seconds, and the answer says so.
    workers : int
        Threads that decode and score clips (the bounded pool).
    queue_size : int
        Requests that may wait for a worker; one more is answered 503.
    top_k : int
        Labels returned when the request does not say (``?top_k=``).
    torch_threads : int or None
        Intra-op threads torch uses per inference, set process-wide by :func:`serve`
        (None leaves torch's default). One per worker thread avoids oversubscribing the
        cores: with two workers on two busy cores, torch's own pool of 2 made each
        inference ~40x slower here than 1 thread did.
    """

    max_upload_bytes: int = 20_000_000
    max_duration: float = 30.0
    workers: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    queue_size: int = 16
    top_k: int = 5
    torch_threads: int | None = 1

    def __post_init__(self):
        if self.max_upload_bytes <= 0 or self.max_duration <= 0:
            raise ConfigError(f"max_upload_bytes and max_duration must be positive: {self}")
        if self.workers < 1 or self.queue_size < 0 or self.top_k < 1:
            raise ConfigError(f"need workers >= 1, queue_size >= 0, top_k >= 1: {self}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be at least 1: {self}")

    @property
    def capacity(self) -> int:
        """Requests admitted at once (running plus waiting)."""
        return self.workers + self.queue_size


class Prediction(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1)


class PredictResponse(BaseModel):
    filename: str = Field(description="name of the upload (multipart) or ?filename=")
    predictions: list[Prediction] = Field(description="top-k labels, most probable first")
    duration_s: float = Field(description="seconds of audio analysed")
    clip_duration_s: float | None = Field(
        description="length of the whole clip in seconds, where its header tells"
    )
    truncated: bool = Field(description="true when only the first max_duration_s were analysed")
    max_duration_s: float
    notice: str | None = Field(None, description="what was done differently, e.g. truncation")
    processing_ms: float = Field(description="decoding, features and inference")
    queue_ms: float = Field(description="time spent waiting for a worker")
    spectrogram_png: str | None = Field(
        None, description="log-mel spectrogram as a base64 PNG (with ?spectrogram=true)"
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable kind of error")
    detail: str = Field(description="what went wrong, naming the upload")
    filename: str | None = None


class LabelsResponse(BaseModel):
    labels: list[str]
    count: int


class HealthResponse(BaseModel):
    status: str
    model: str
    labels: int
    pending: int = Field(description="requests admitted now (running plus waiting)")
    capacity: int = Field(description="requests admitted at most; more get 503")
    workers: int
    uptime_s: float


class ApiError(Exception):
    """An error answered as ``ErrorResponse`` JSON with ``status``."""

    def __init__(self, status: int, error: str, detail: str, filename: str | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.filename = status, error, detail, filename


def _error_response(status: int, error: str, detail: str, filename: str | None = None, **kw):
    body = ErrorResponse(error=error, detail=detail, filename=filename).model_dump()
    return JSONResponse(body, status_code=status, **kw)


#: Leading bytes of the containers soundsight decodes; used only to tell a damaged audio
#: file (422) from something that is not audio at all (415) once decoding has failed.
_MAGIC = (
    (b"RIFF", "WAV"),
    (b"RF64", "WAV"),
    (b"fLaC", "FLAC"),
    (b"OggS", "OGG"),
    (b"ID3", "MP3"),
    (b"FORM", "AIFF"),
)


def sniff_audio(data: bytes) -> str | None:
    """The audio container ``data`` starts like, or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    # An MPEG audio frame header starts with 11 set bits (MP3 without an ID3 tag).
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "MP3"
    return None


def _clip_seconds(data: bytes) -> float | None:
    """Length of the whole clip from its header (None where the format does not tell)."""
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - any failure just means 'unknown'
        return None
    return float(info.duration) if info.frames > 0 and info.samplerate > 0 else None


class _Analyser:
    """Decoding and scoring one upload; runs in a worker thread."""

    def __init__(self, classifier: Classifier, settings: ServeConfig):
        self.classifier, self.settings = classifier, settings

    def __call__(self, data: bytes, name: str, top_k: int, image: bool) -> dict[str, Any]:
        started = time.perf_counter()
        clf, limit = self.classifier, self.settings.max_duration
        try:
            wave = decode_bytes(data, clf.features.sample_rate, name, max_duration=limit)
        except AudioError as err:
            raise _audio_error(err, data, name) from None
        analysed = len(wave) / clf.features.sample_rate
        whole = _clip_seconds(data)
        # Decoding stopped at the limit; a clip that reached it is taken as longer when its
        # header gives no length (MP3 may not).
        truncated = whole > limit + 1e-3 if whole is not None else analysed >= limit - 1e-3
        db = clf.log_mel(wave)
        probabilities = clf.probabilities([db])[0]
        result: dict[str, Any] = {
            "filename": name,
            "predictions": [
                {"label": label, "probability": min(max(p, 0.0), 1.0)}
                for label, p in clf.top(probabilities, top_k)
            ],
            "duration_s": round(analysed, 4),
            "clip_duration_s": None if whole is None else round(whole, 4),
            "truncated": truncated,
            "max_duration_s": limit,
            "notice": None,
        }
        if truncated:
            length = f"{whole:.1f} s long" if whole is not None else "longer than that"
            result["notice"] = f"clip is {length}; analysed its first {limit:g} s only"
        if image:
            png = io.BytesIO()
            spectrogram_image(db, clf.features.floor_db, size=None).save(png, format="PNG")
            result["spectrogram_png"] = base64.b64encode(png.getvalue()).decode("ascii")
        result["processing_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return result


class _WorkerPool:
    """The inference threads, started on first use and stopped at shutdown; an app
    started again (as test clients do) gets a fresh pool."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], Any]) -> Future:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.workers, thread_name_prefix="soundsight-infer", initializer=_init_worker
                )
            return self._pool.submit(fn)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _init_worker() -> None:
    import torch

    # Denormal floats make convolutions many times slower on x86; the flag is
    # per-thread, so each worker sets it (as training and the feature cache do).
    torch.set_flush_denormal(True)


def _audio_error(err: AudioError, data: bytes, name: str) -> ApiError:
    kind = sniff_audio(data)
    if err.reason.startswith("not a readable audio file") and kind is None:
        return ApiError(
            415,
            "unsupported_media_type",
            f"{name}: not an audio file; expected WAV, FLAC, OGG, MP3 or AIFF ({err.reason})",
            name,
        )
    what = f"damaged {kind} file" if kind else "unusable audio"
    return ApiError(422, "invalid_audio", f"{name}: {what}: {err.reason}", name)


def _capped(receive: Callable[[], Awaitable[dict]], limit: int, name: str | None):
    """``receive`` that answers 413 once more than ``limit`` body bytes have come in, so
    an upload without (or lying about) Content-Length cannot fill memory."""
    seen = 0

    async def capped_receive() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit, name)
        return message

    return capped_receive


def _too_large(limit: int, name: str | None) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"{name or 'upload'}: larger than the {limit / 1e6:g} MB limit",
        name,
    )


async def _read_upload(request: Request, limit: int, filename: str | None) -> tuple[bytes, str]:
    """The uploaded file's bytes and name, from a multipart form or the raw body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = content_type == "multipart/form-data"
    budget = limit + (MULTIPART_OVERHEAD if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > budget:
        raise _too_large(limit, filename)
    capped = Request(request.scope, _capped(request.receive, budget, filename))
    if content_type == "application/x-www-form-urlencoded":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send audio as multipart/form-data (field 'file') or as the raw request body",
            filename,
        )
    if not multipart:
        return await capped.body(), filename or "upload"
    try:
        form = await capped.form(max_files=1, max_fields=8)
    except ApiError:
        raise
    except Exception as err:  # starlette raises HTTPException/MultiPartException variants
        raise ApiError(
            422, "bad_multipart", f"malformed multipart body ({err})", filename
        ) from None
    try:
        upload = form.get(UPLOAD_FIELD)
        if upload is None or isinstance(upload, str):
            raise ApiError(
                422, "missing_file", f"multipart upload needs a file in field '{UPLOAD_FIELD}'"
            )
        name = filename or upload.filename or "upload"
        if upload.size is not None and upload.size > limit:
            raise _too_large(limit, name)
        return await upload.read(), name
    finally:
        await form.close()


PREDICT_BODY = {
    "required": True,
    "description": "An audio file (WAV, FLAC, OGG, MP3, AIFF): a multipart form with the "
    f"file in field '{UPLOAD_FIELD}', or the file itself as the body (any audio/* type or "
    "application/octet-stream).",
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}},
                "required": [UPLOAD_FIELD],
            }
        },
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    meaning = {
        413: "upload larger than the size limit",
        415: "not an audio file, or an unsupported request body type",
        422: "damaged or unusable audio, a malformed form, or invalid parameters",
        503: "the request queue is full; retry later",
    }
    return {c: {"model": ErrorResponse, "description": meaning[c]} for c in codes}


def create_app(
    classifier: Classifier, settings: ServeConfig | None = None, model_name: str = "model"
) -> FastAPI:
    """The HTTP app serving ``classifier`` (loaded once, shared by all requests);
    ``model_name`` is what ``/health`` calls it."""
    settings = settings or ServeConfig()
    analyse = _Analyser(classifier, settings)
    pool = _WorkerPool(settings.workers)
    started = time.monotonic()
    state = {"pending": 0}
    count = len(classifier.labels)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        pool.shutdown()

    docs_assets = _docs_assets()
    app = FastAPI(
        title="soundsight",
        summary="Label sounds with a CNN fine-tuned on log-mel spectrograms.",
        version=_version(),
        lifespan=lifespan,
        # FastAPI's own doc pages load Swagger UI and ReDoc from a CDN; use local copies.
        docs_url=None if docs_assets else "/docs",
        redoc_url=None if docs_assets else "/redoc",
    )
    if docs_assets:
        _add_offline_docs(app, docs_assets)
    app.state.settings = settings
    app.state.classifier = classifier

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return _error_response(err.status, err.error, err.detail, err.filename, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, err: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors()
        )
        return _error_response(422, "invalid_request", problems or "invalid request")

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_none=False,
        summary="Label an audio clip",
        responses=_responses(413, 415, 422, 503),
        openapi_extra={"requestBody": PREDICT_BODY},
    )
    async def predict(
        request: Request,
        top_k: Annotated[int | None, Query(ge=1, le=count, description="labels to return")] = None,
        spectrogram: Annotated[
            bool, Query(description="include the log-mel spectrogram as a base64 PNG")
        ] = False,
        filename: Annotated[
            str | None, Query(max_length=255, description="name of a raw-body upload")
        ] = None,
    ) -> dict[str, Any]:
        # Admission before reading the body: a full queue costs no upload memory.
        if state["pending"] >= settings.capacity:
            raise ApiError(
                503,
                "queue_full",
                f"{settings.capacity} requests are already being served or waiting; retry",
            )
        state["pending"] += 1
        loop = asyncio.get_running_loop()

        def release() -> None:
            state["pending"] -= 1

        def release_from_worker(_future) -> None:
            # RuntimeError: the loop is gone (shutdown), nothing left to count.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(release)

        submitted = False
        try:
            data, name = await _read_upload(request, settings.max_upload_bytes, filename)
            queued = time.perf_counter()
            k = top_k or min(settings.top_k, count)

            def job():
                waited = (time.perf_counter() - queued) * 1000
                return analyse(data, name, k, spectrogram), waited

            future = pool.submit(job)
            submitted = True
            # The slot is freed when the job is done, not when this handler ends: a
            # client that disconnects must not free a slot its upload still occupies in
            # the pool. (A job that has not started is cancelled along with the handler.)
            future.add_done_callback(release_from_worker)
            result, waited = await asyncio.wrap_future(future)
            result["queue_ms"] = round(waited, 3)
            return result
        finally:
            if not submitted:
                release()

    @app.get("/labels", response_model=LabelsResponse, summary="The labels the model knows")
    async def labels() -> dict[str, Any]:
        return {"labels": classifier.labels, "count": count}

    @app.get("/health", response_model=HealthResponse, summary="Liveness and queue state")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "labels": count,
            "pending": state["pending"],
            "capacity": settings.capacity,
            "workers": settings.workers,
            "uptime_s": round(time.monotonic() - started, 3),
        }

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(
            (STATIC / "index.html").read_text(encoding="utf-8"),
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
        )

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


#: The page may load nothing from anywhere but this app (images and audio also come
#: from data: and blob: URLs it makes itself): it must work offline.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'"
)


DOCS_ASSETS_URL = "/docs-assets"


def _docs_assets() -> Path | None:
    """Folder of Swagger UI and ReDoc files (package fastapi-offline), if installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _add_offline_docs(app: FastAPI, folder: Path) -> None:
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=str(folder)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("soundsight")
    except PackageNotFoundError:
        return "0"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_for_serving(model_path: str | os.PathLike, settings: ServeConfig) -> Classifier:
    """Load the model once, set torch's threads and warm it up (the first inference
    allocates and picks kernels; it should not land on the first client)."""
    import torch

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    classifier = Classifier.load(model_path)
    silence = np.zeros(classifier.features.sample_rate, np.float32)
    classifier.probabilities([classifier.log_mel(silence)])
    return classifier


def serve(
    model_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeConfig | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Load ``model_path`` and serve it with uvicorn until interrupted."""
    import uvicorn

    settings = settings or ServeConfig()
    if not is_loopback(host):
        print(
            f"warning: serving on {host}, reachable from other machines; "
            "the API has no authentication",
            file=sys.stderr,
        )
    app = create_app(load_for_serving(model_path, settings), settings, Path(model_path).name)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        # A backstop beyond the app's own queue: connections past this get 503 from
        # uvicorn before any app code runs (idle keep-alive connections count too).
        limit_concurrency=settings.capacity + 64,
        timeout_keep_alive=5,
    )
