"""Serving a trained model over HTTP: a JSON API and a page to try it in a browser.

``create_app(classifier, settings)`` builds the FastAPI app; :func:`serve` loads a model
file once and runs the app under uvicorn (``soundsight serve MODEL``).

Endpoints: ``POST /predict`` (multipart upload in field ``file``, or the raw audio as the
request body), ``GET /labels``, ``GET /health``, the OpenAPI docs at ``/docs`` and
``/redoc`` (Swagger UI and ReDoc served from this app by fastapi-offline) and the page at
``/`` (a single HTML file with its script inline: nothing is fetched from elsewhere, so
it works offline).

Resources stay bounded, and slow clients cannot starve the others:

- a request's whole body (at most ``max_upload_bytes``, 413 past it) is read *before*
  it asks for an inference slot, under a deadline (``body_timeout``) and an idle limit
  (``body_idle_timeout``), both answered 408; a connection must finish each request's
  headers within ``header_timeout`` or is closed; uvicorn holds at most
  ``max_connections`` connections;
- the bytes held by all uploads at once (being received, waiting or being analysed)
  are capped at :attr:`ServeConfig.upload_memory_bytes`, and at most ``workers +
  queue_size`` requests are admitted to the inference queue: past either, 503 with
  ``Retry-After``;
- decoding and inference run off the event loop in a fixed pool of ``workers`` threads.

Requests are scored one clip at a time, not batched across requests: a clip is already
a batch of sliding windows (10 for 5 s), and batching 2-8 clips together measured no
lower CPU time per clip on this project's 2-core CPU machines.
"""

import asyncio
import base64
import ctypes
import io
import ipaddress
import math
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import h11
import numpy as np
import soundfile as sf
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from .audio import AudioError, decode_bytes
from .calibration import UNKNOWN_LABEL
from .errors import ConfigError
from .runtime import MAX_SECONDS, ClipScorer, OnnxClassifier, load_classifier

#: Largest multipart envelope (boundaries, part headers) allowed on top of the file.
MULTIPART_OVERHEAD = 64 * 1024
#: Name of the multipart field that holds the upload.
UPLOAD_FIELD = "file"
STATIC = resources.files("soundsight") / "static"
#: What Starlette's TrustedHostMiddleware accepts as an allowed host (it only asserts).
HOST_PATTERN = re.compile(r"\*|(\*\.)?[^*\s/]+")


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
        Intra-op threads per inference: torch's, set process-wide by :func:`serve`
        (None leaves torch's default), or the ONNX runtime's session (None: one per
        core). One per worker thread avoids oversubscribing the
        cores: with two workers on two busy cores, torch's own pool of 2 made each
        inference ~40x slower here than 1 thread did.
    header_timeout : float
        Seconds a connection has to send a request's headers, from its first byte (or
        from opening, for its first request); past it the connection is closed.
    body_idle_timeout : float
        Seconds without a byte of the body after which the request is answered 408.
    body_timeout : float
        Seconds the whole body may take to arrive (408 past it), however it trickles:
        20 MB in 60 s needs about 330 kB/s.
    keep_alive_timeout : float
        Seconds an idle keep-alive connection is kept open (uvicorn's).
    max_connections : int
        Connections held at once (uvicorn's ``limit_concurrency``: more get 503 before
        any of the app runs). Must exceed ``workers + queue_size``.
    allowed_hosts : tuple of str or None
        Host header values accepted (400 otherwise; ``"*.example.com"`` matches
        subdomains, ``"*"`` anything). None: the loopback names, plus the bound address
        when :func:`serve` binds a specific non-loopback one.
    """

    max_upload_bytes: int = 20_000_000
    max_duration: float = 30.0
    workers: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    queue_size: int = 16
    top_k: int = 5
    torch_threads: int | None = 1
    header_timeout: float = 10.0
    body_idle_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 512
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.max_upload_bytes <= 0 or self.max_duration <= 0:
            raise ConfigError(f"max_upload_bytes and max_duration must be positive: {self}")
        if self.workers < 1 or self.queue_size < 0 or self.top_k < 1:
            raise ConfigError(f"need workers >= 1, queue_size >= 0, top_k >= 1: {self}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"torch_threads must be at least 1: {self}")
        for name in ("header_timeout", "body_idle_timeout", "body_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.body_idle_timeout > self.body_timeout:
            raise ConfigError(
                f"body_idle_timeout ({self.body_idle_timeout:g} s) cannot exceed "
                f"body_timeout ({self.body_timeout:g} s)"
            )
        if self.max_connections <= self.capacity:
            raise ConfigError(
                f"max_connections ({self.max_connections}) must exceed workers + queue_size "
                f"({self.capacity}), or uvicorn refuses requests the queue would take"
            )
        if self.allowed_hosts is not None:
            if isinstance(self.allowed_hosts, str):
                raise ConfigError(
                    f"allowed_hosts must be a list of names, not the string {self.allowed_hosts!r}"
                )
            hosts = tuple(self.allowed_hosts)
            for host in hosts:
                if not isinstance(host, str) or not HOST_PATTERN.fullmatch(host):
                    raise ConfigError(
                        f"allowed_hosts: {host!r} is not a host name, '*.domain' or '*'"
                    )
            object.__setattr__(self, "allowed_hosts", hosts)

    @property
    def capacity(self) -> int:
        """Requests admitted at once (running plus waiting)."""
        return self.workers + self.queue_size

    @property
    def upload_memory_bytes(self) -> int:
        """Body bytes held by all requests at once: as many full uploads as the queue
        admits, whether they are still arriving, waiting or being analysed."""
        return self.capacity * (self.max_upload_bytes + MULTIPART_OVERHEAD)


class Event(BaseModel):
    onset: float = Field(description="seconds from the start of the clip")
    offset: float
    event_label: str
    probability: float = Field(ge=0, le=1, description="peak smoothed probability")


class Prediction(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1)


class PredictResponse(BaseModel):
    filename: str = Field(description="name of the upload (multipart) or ?filename=")
    label: str = Field(
        description="the answer: the most probable label, or 'unknown' when the clip "
        "scores below the model file's rejection threshold"
    )
    unknown: bool = Field(description="true when the clip is unlike every known class")
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
    events: list[Event] | None = Field(
        None,
        description="the clip's sound events, in time order (with ?timeline=true; null with the "
        "ONNX runtime, which scores whole clips, and for a frozen model with a BirdNET part)",
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

    def __init__(self, classifier: ClipScorer, settings: ServeConfig):
        self.classifier, self.settings = classifier, settings

    def __call__(
        self, data: bytes, name: str, top_k: int, image: bool, timeline: bool = False
    ) -> dict[str, Any]:
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
        probabilities, db, known = clf.analyse(wave)
        result: dict[str, Any] = {
            "filename": name,
            "label": clf.top(probabilities, 1)[0][0] if known else UNKNOWN_LABEL,
            "unknown": not known,
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
            result["spectrogram_png"] = base64.b64encode(clf.spectrogram_png(db)).decode("ascii")
        if timeline:  # the events of soundsight detect, on the analysed part
            result["events"] = _timeline_events(clf, wave, db)
        result["processing_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return result

    def queued(
        self, queued: float, data: bytes, name: str, top_k: int, image: bool, timeline: bool
    ) -> tuple[dict[str, Any], float]:
        """The job a worker runs: the analysis and the ms it waited since ``queued``."""
        waited = (time.perf_counter() - queued) * 1000
        return self(data, name, top_k, image, timeline), waited


def _timeline_events(
    clf: ClipScorer, wave: np.ndarray, db: np.ndarray
) -> list[dict[str, Any]] | None:
    """The events of ``soundsight detect`` in an analysed clip (its waveform and the
    model's log-mel of it); None with the ONNX runtime, whose graph scores whole clips
    (timelines slide windows through the torch scorer), and for a frozen model with a
    BirdNET part (whole clips only)."""
    from .detection import DetectConfig, find_events, frozen_timeline, thresholds
    from .detection import timeline as frame_timeline
    from .frozen import FrozenClassifier, NetworkPart
    from .prediction import Classifier

    if isinstance(clf, FrozenClassifier):
        if not all(isinstance(part, NetworkPart) for part in clf.parts):
            return None
        line = frozen_timeline(clf, wave)
    elif isinstance(clf, Classifier):
        line = frame_timeline(clf, db.shape[1], [db])
    else:
        return None
    events = find_events(line, DetectConfig(), thresholds(clf, DetectConfig()))
    return events.to_dict("records")


#: glibc's ``mallopt`` parameters (malloc.h): ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``.
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
#: Buffers from this size up (a near-limit upload) get pages of their own, unmapped as
#: soon as they are freed. Smaller ones (decoded clips, the network's activations) are
#: carved from the heaps, which keep up to :data:`TRIM_THRESHOLD_BYTES` free at their top.
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024


def unmap_large_buffers() -> bool:
    """Fix glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD_BYTES`,
    :data:`TRIM_THRESHOLD_BYTES`) for the process; set by :func:`serve`. False where the
    C library is not glibc (nothing is changed there).

    Why by hand: glibc raises its mmap threshold to the size of the largest mapped
    buffer freed so far (up to 32 MB), so after the first 20 MB upload every later
    upload of up to that size is carved from the threads' heaps instead, and those
    heaps keep what was freed in them: with ``benchmarks/bench_hostile_serve.py``
    (10 bursts of 8 concurrent 19.8 MB uploads) the server's RSS grew by 142-148 MB
    from the first burst to the tenth and kept rising; ``malloc_trim`` before each job
    did not help. A fixed threshold stops that, but fixing one also fixes the trim
    threshold at its 128 kB default, and a low mmap threshold maps the network's
    activations afresh on every request: 256 kB cost 2,395 page faults per 5-s clip and
    a munmap (a TLB shootdown across the worker threads) per activation, which took the
    server's CPU per request from 0.032 s to 0.07 s. At 16 MB / 16 MB a clip costs no
    page fault (measured in-process, as before the fix). Python exposes no ``mallopt``;
    the ``MALLOC_*_`` variables only work if set before the process starts.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


class _WorkerPool:
    """The inference threads, started on first use and stopped at shutdown; an app
    started again (as test clients do) gets a fresh pool."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.workers, thread_name_prefix="soundsight-infer", initializer=_init_worker
                )
            return self._pool.submit(fn, *args)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _init_worker() -> None:
    # Denormal floats make convolutions many times slower on x86; the flag is
    # per-thread, so each worker sets it (as training and the feature cache do). Only
    # for the torch runtime: ONNX Runtime flushes them itself (runtime.session_options).
    torch = sys.modules.get("torch")
    if torch is not None:
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


#: Request body types (and multipart part types) that may hold audio. No type at all is
#: taken as raw audio too; anything else is refused (415) before its body is read, so a
#: text or form body is never handed to the decoder.
AUDIO_MEDIA_TYPES = ("application/octet-stream", "application/ogg")
MULTIPART = "multipart/form-data"


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def _is_audio_type(media_type: str) -> bool:
    return not media_type or media_type.startswith("audio/") or media_type in AUDIO_MEDIA_TYPES


def _check_body_type(media_type: str, filename: str | None) -> None:
    if media_type != MULTIPART and not _is_audio_type(media_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"request body type '{media_type}' is not audio: send the file as "
            f"multipart/form-data (field '{UPLOAD_FIELD}') or as the raw request body "
            "(audio/* or application/octet-stream)",
            filename,
        )


class _UploadMemory:
    """Body bytes held by all requests, from their first byte until their analysis ends,
    capped so that many concurrent uploads cannot fill memory. Used on the event loop
    only (workers hand their releases to it)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise ApiError(
                503,
                "server_busy",
                f"uploads already hold {self.held / 1e6:.1f} MB of the "
                f"{self.limit / 1e6:g} MB the server buffers at once; retry",
            )
        self.held += size

    def give(self, size: int) -> None:
        self.held -= size


class _BodyReader:
    """``receive`` for one request that enforces the upload's size limit (413, also for
    a body without or lying about Content-Length), the body deadlines (408) and the
    upload memory cap (503), counting the bytes it lets in (``taken``)."""

    def __init__(
        self,
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        settings: ServeConfig,
        memory: _UploadMemory,
        budget: int,
        name: str | None,
    ):
        self._receive, self.settings, self.memory = receive, settings, memory
        self.budget, self.name, self.taken = budget, name, 0
        self._deadline = time.monotonic() + settings.body_timeout

    async def __call__(self) -> MutableMapping[str, Any]:
        remaining = self._deadline - time.monotonic()
        idle = self.settings.body_idle_timeout
        try:
            async with asyncio.timeout(max(0.0, min(idle, remaining))):
                message = await self._receive()
        except TimeoutError:
            if remaining <= idle:
                why = f"not complete within {self.settings.body_timeout:g} s"
            else:
                why = f"no data for {idle:g} s"
            upload = self.name or "upload"
            raise ApiError(
                408, "request_timeout", f"{upload}: request body {why}", self.name
            ) from None
        if message["type"] == "http.request":
            size = len(message.get("body", b""))
            if self.taken + size > self.budget:
                raise _too_large(self.settings.max_upload_bytes, self.name)
            self.memory.take(size)
            self.taken += size
        return message


def _too_large(limit: int, name: str | None) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"{name or 'upload'}: larger than the {limit / 1e6:g} MB limit",
        name,
    )


async def _read_upload(
    request: Request, media_type: str, reader: _BodyReader, filename: str | None
) -> tuple[bytes, str]:
    """The uploaded file's bytes and name, from a multipart form or the raw body, read
    through ``reader``."""
    limit = reader.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > reader.budget:
        raise _too_large(limit, filename)
    guarded = Request(request.scope, reader)
    if media_type != MULTIPART:
        return await guarded.body(), filename or "upload"
    try:
        form = await guarded.form(max_files=1, max_fields=8)
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
        part_type = _media_type(upload.content_type)
        if not _is_audio_type(part_type):
            raise ApiError(
                415,
                "unsupported_media_type",
                f"{name}: not an audio file (sent as '{part_type}'); "
                "expected WAV, FLAC, OGG, MP3 or AIFF",
                name,
            )
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
        408: "the request body did not arrive in time",
        413: "upload larger than the size limit",
        415: "not an audio file, or a request body type that is not audio",
        422: "damaged or unusable audio, a malformed form, or invalid parameters",
        503: "the request queue or the upload memory is full; retry later",
    }
    return {c: {"model": ErrorResponse, "description": meaning[c]} for c in codes}


#: Headers of error answers: when to retry an overload, and closing the connection
#: after an answer given before the whole body was read (uvicorn would otherwise go on
#: reading and discarding the rest of it, for as long as the client sends).
ERROR_HEADERS = {
    503: {"Retry-After": "1", "Connection": "close"},
    **{status: {"Connection": "close"} for status in (408, 413, 415)},
}


class _Admission:
    """The request queue of one app: admits a request once its whole body is read, runs
    it in the worker pool, and frees its slot and its upload's bytes when the job ends."""

    def __init__(self, analyse: _Analyser, settings: ServeConfig, count: int):
        self.analyse = analyse
        self.settings = settings
        self.count = count
        self.pool = _WorkerPool(settings.workers)
        self.memory = _UploadMemory(settings.upload_memory_bytes)
        self.pending = 0

    def _check_room(self) -> None:
        if self.pending >= self.settings.capacity:
            raise ApiError(
                503,
                "queue_full",
                f"{self.settings.capacity} requests are already being served or waiting; retry",
            )

    async def predict(
        self,
        request: Request,
        top_k: int | None,
        spectrogram: bool,
        filename: str | None,
        timeline: bool,
    ) -> dict[str, Any]:
        settings = self.settings
        media_type = _media_type(request.headers.get("content-type"))
        _check_body_type(media_type, filename)
        # A full queue is refused before the body is read: the upload would be wasted.
        self._check_room()
        budget = settings.max_upload_bytes + (MULTIPART_OVERHEAD if media_type == MULTIPART else 0)
        reader = _BodyReader(request.receive, settings, self.memory, budget, filename)
        loop = asyncio.get_running_loop()

        def release() -> None:  # the job is done: its slot and its upload's bytes
            self.pending -= 1
            self.memory.give(reader.taken)

        def release_from_worker(_future) -> None:
            # RuntimeError: the loop is gone (shutdown), nothing left to count.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(release)

        admitted = submitted = False
        try:
            # The whole body is read before the request takes a slot in the queue, so a
            # slow client holds a connection (until its deadline), never a slot.
            data, name = await _read_upload(request, media_type, reader, filename)
            self._check_room()
            self.pending += 1
            admitted = True
            k = top_k or min(settings.top_k, self.count)
            future = self.pool.submit(
                self.analyse.queued, time.perf_counter(), data, name, k, spectrogram, timeline
            )
            submitted = True
            # The pool's work item holds the upload from now on, and drops it as soon as
            # the job ends (in the worker), whenever this handler ends.
            del data
            # The slot is freed when the job is done, not when this handler ends: a
            # client that disconnects must not free a slot its upload still occupies in
            # the pool. (A job that has not started is cancelled along with the handler.)
            future.add_done_callback(release_from_worker)
            result, waited = await asyncio.wrap_future(future)
            result["queue_ms"] = round(waited, 3)
            return result
        finally:
            if not submitted:
                self.memory.give(reader.taken)
                self.pending -= admitted


async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
    headers = ERROR_HEADERS.get(err.status)
    return _error_response(err.status, err.error, err.detail, err.filename, headers=headers)


async def _invalid_request(_request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors()
    )
    return _error_response(422, "invalid_request", problems or "invalid request")


def create_app(
    classifier: ClipScorer, settings: ServeConfig | None = None, model_name: str = "model"
) -> FastAPI:
    """The HTTP app serving ``classifier`` (loaded once, shared by all requests).

    Parameters
    ----------
    classifier : ClipScorer
        Either runtime's classifier (:class:`~soundsight.prediction.Classifier` or
        :class:`~soundsight.runtime.OnnxClassifier`).
        The model; its labels are what ``/labels`` lists.
    settings : ServeConfig, optional
        Limits; ``settings.allowed_hosts`` None accepts the loopback names only.
    model_name : str
        What ``/health`` calls the model.

    Returns
    -------
    FastAPI
        The app, with its docs served offline and security headers on every answer.
    """
    settings = settings or ServeConfig()
    count = len(classifier.labels)
    queue = _Admission(_Analyser(classifier, settings), settings, count)
    started = time.monotonic()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        queue.pool.shutdown()

    # FastAPI's own doc pages load Swagger UI and ReDoc from a CDN; fastapi-offline
    # serves the same files from this app.
    app = FastAPIOffline(
        title="soundsight",
        summary="Label sounds with a CNN fine-tuned on log-mel spectrograms.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.classifier = classifier
    # Added last, so outermost: refused hosts get the security headers too.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(_allowed_hosts(settings)))
    app.add_middleware(SecurityHeadersMiddleware)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RequestValidationError)(_invalid_request)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_none=False,
        summary="Label an audio clip",
        responses=_responses(408, 413, 415, 422, 503),
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
        timeline: Annotated[
            bool, Query(description="include the clip's sound events (soundsight detect)")
        ] = False,
    ) -> dict[str, Any]:
        return await queue.predict(request, top_k, spectrogram, filename, timeline)

    @app.get("/labels", response_model=LabelsResponse, summary="The labels the model knows")
    async def labels() -> dict[str, Any]:
        return {"labels": classifier.labels, "count": count}

    @app.get("/health", response_model=HealthResponse, summary="Liveness and queue state")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "labels": count,
            "pending": queue.pending,
            "capacity": settings.capacity,
            "workers": settings.workers,
            "uptime_s": round(time.monotonic() - started, 3),
        }

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


#: Every answer may load nothing from anywhere but this app (the page's images and
#: audio also come from data: and blob: URLs it makes itself; ReDoc runs its search in a
#: blob: worker): the page and the docs must work offline. No other site may frame them.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src 'self' blob:; connect-src 'self'; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to every HTTP answer (pages, docs, JSON, errors,
    static files). Starlette and FastAPI ship no such middleware."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


#: Host names of the loopback interface, as clients write them in the Host header.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _allowed_hosts(settings: ServeConfig, bound: str | None = None) -> tuple[str, ...]:
    """The Host header values to accept: ``settings.allowed_hosts`` when given, else the
    loopback names plus ``bound`` (a specific non-loopback address :func:`serve` binds)."""
    if settings.allowed_hosts is not None:
        return settings.allowed_hosts
    if bound is None or is_loopback(bound):
        return LOOPBACK_HOSTS
    try:
        address = ipaddress.ip_address(bound.strip("[]"))
    except ValueError:  # a host name
        return (*LOOPBACK_HOSTS, bound.lower())
    if address.is_unspecified:
        raise ConfigError(
            f"serving on {bound} (every interface): name the host names clients will use "
            "with --allowed-host (ServeConfig.allowed_hosts), or '*' to accept any"
        )
    return (*LOOPBACK_HOSTS, f"[{address}]" if address.version == 6 else str(address))


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


def load_for_serving(
    model_path: str | os.PathLike, settings: ServeConfig, runtime: str | None = None
) -> ClipScorer:
    """Load the model once in ``runtime`` (``onnx``, ``torch``, or None: ``onnx`` for a
    ``.onnx`` file; see :func:`~soundsight.runtime.load_classifier`) with
    ``settings.torch_threads`` threads per inference, and warm it up (the first
    inference allocates and picks kernels; it should not land on the first client)."""
    classifier = load_classifier(model_path, runtime, settings.torch_threads)
    if isinstance(classifier, OnnxClassifier) and settings.max_duration > MAX_SECONDS:
        raise ConfigError(
            f"--max-duration {settings.max_duration:g} s: the ONNX runtime scores clips of "
            f"up to {MAX_SECONDS:g} s (use --runtime torch for longer)"
        )
    with warnings.catch_warnings():  # about the warm-up's silence, not a user's clip
        warnings.simplefilter("ignore")
        classifier.analyse(np.zeros(classifier.features.sample_rate, np.float32))
    return classifier


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers.

    uvicorn has no such timeout (its own list of wanted timeouts, issue #157, still has
    it open): its keep-alive timer is never started on a new connection and is stopped
    by the first byte of a request, so a client that opens connections and never
    finishes their headers holds them for ever, and past ``limit_concurrency`` every
    other client gets 503. An ASGI middleware cannot help: the app is only called once
    the headers are complete. Subclassed by :func:`uvicorn_config` with the timeout.
    """

    header_timeout: float = 10.0

    def connection_made(self, transport) -> None:  # noqa: ANN001 - uvicorn's signature
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self.timeout_keep_alive_handler
        )

    def data_received(self, data: bytes) -> None:
        # The first bytes of a request on a kept-alive connection start its deadline.
        if self._header_deadline is None and self.conn.their_state is h11.IDLE:
            self._header_deadline = self.loop.call_later(
                self.header_timeout, self.timeout_keep_alive_handler
            )
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._stop_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_deadline()
        super().connection_lost(exc)

    def _stop_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None


def uvicorn_config(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeConfig | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> uvicorn.Config:
    """The uvicorn ``Config`` that :func:`serve` runs ``app`` with: ``settings``'s
    connection limit, keep-alive and header timeouts.

    Returns
    -------
    uvicorn.Config
    """
    settings = settings or ServeConfig()
    protocol = type(
        "HeaderDeadlineProtocol",
        (HeaderDeadlineProtocol,),
        {"header_timeout": settings.header_timeout},
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        http=protocol,
        # Connections past this get 503 from uvicorn before any app code runs (idle
        # keep-alive ones and ones still sending headers count too); the app's own
        # queue and upload memory bound the work and the bytes.
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=math.ceil(settings.keep_alive_timeout),  # uvicorn takes whole s
    )


def serve(
    model_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeConfig | None = None,
    log_level: str = "info",
    access_log: bool = True,
    runtime: str | None = None,
) -> None:
    """Load ``model_path`` in ``runtime`` (see :func:`load_for_serving`) and serve it
    with uvicorn until interrupted.

    Raises
    ------
    ConfigError
        ``host`` is a wildcard address (every interface) and ``settings.allowed_hosts``
        does not say which Host names to accept.
    """
    settings = settings or ServeConfig()
    settings = replace(settings, allowed_hosts=_allowed_hosts(settings, host))
    unmap_large_buffers()
    if not is_loopback(host):
        print(
            f"warning: serving on {host}, reachable from other machines; "
            "the API has no authentication",
            file=sys.stderr,
        )
    classifier = load_for_serving(model_path, settings, runtime)
    app = create_app(classifier, settings, Path(model_path).name)
    uvicorn.Server(uvicorn_config(app, host, port, settings, log_level, access_log)).run()
