"""The labelling page of ``soundsight label INDEX``: search an index by example, listen
to each hit, say whether it is the sound, retrain, and get what to label next.

The app is served like ``soundsight serve``'s (:mod:`soundsight.serving`: the same
security headers, Host check, uvicorn settings and header deadline) and its page
(``static/label.html``) loads nothing from elsewhere. Every click is one SQLite
transaction (:meth:`~soundsight.search.Index.label`), committed before the answer
goes back, so closing the page or killing the server loses nothing.

Bound to 127.0.0.1 by default. On any other address every request must carry the
token printed at start (``X-Soundsight-Token`` header, or ``?token=`` for the page,
its images and audio): the page can change the index's labels. State-changing
requests must be ``application/json``, which a form on another site cannot send
without the browser asking first (CORS), so a page elsewhere cannot click for you.
"""

from __future__ import annotations

import io
import os
import secrets
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .audio import AudioError, read_segment
from .errors import SoundsightError
from .search import Index, SearchError, clip_query, label_query, nearest
from .serving import (
    STATIC,
    SecurityHeadersMiddleware,
    ServeConfig,
    _allowed_hosts,
    is_loopback,
    uvicorn_config,
)

#: Largest query upload (bytes): a query is a clip, not a recording.
MAX_QUERY_BYTES = 20_000_000
TOKEN_HEADER = "x-soundsight-token"
#: The thumbnails' features (the page's standard log-mel, whatever the index embeds).
THUMBNAIL_RATE = 22050


class SearchRequest(BaseModel):
    row: int | None = Field(None, ge=0, description="search by this indexed window")
    label: str | None = Field(None, max_length=200, description="or by a label's centroid")
    top: int = Field(20, ge=1, le=200)


class LabelRequest(BaseModel):
    row: int = Field(..., ge=0)
    label: Any = Field(..., description="a non-empty string (checked by the index)")
    verdict: str = Field(..., pattern="^(yes|no|skip)$")


class TokenMiddleware:
    """Refuses (401) every request without the token, when there is one."""

    def __init__(self, app: ASGIApp, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.token is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
        if not secrets.compare_digest(given.encode(), self.token.encode()):
            response = JSONResponse(
                {"error": "unauthorized", "detail": "this page needs the token printed at start"},
                status_code=401,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _json_only(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise SearchError("send application/json")  # 400 below; forms cannot click


class LabelSession:
    """The index a labelling app serves, opened once; requests take turns on it (the
    lock), and an upload's embedder (the index's network) is loaded on first use."""

    def __init__(self, index_folder: str | os.PathLike):
        self.index = Index(index_folder)
        self.lock = threading.Lock()
        self._embedder: Any = None

    def embedder(self) -> Any:
        """The index's network; call with the lock held."""
        from .search import embedder_for

        if self._embedder is None:
            self._embedder = embedder_for(self.index)
        return self._embedder

    def hits_json(self, hits, note: str = "", source: str = "") -> dict[str, Any]:
        """Search hits or suggestions as the page shows them, each with its verdicts."""
        verdicts: dict[int, dict[str, int]] = {}
        rows = [int(r) for r in hits["row"]]
        if rows:
            marks = ",".join("?" * len(rows))
            for row, label, verdict in self.index.db.execute(
                f"SELECT row, label, verdict FROM labels WHERE row IN ({marks})", rows
            ):
                verdicts.setdefault(row, {})[label] = verdict
        return {
            "source": source,
            "note": note,
            "hits": [
                {
                    "row": int(h.row),
                    "file": str(h.file),
                    "name": Path(str(h.file)).name,
                    "start": round(float(h.start), 3),
                    "end": round(float(h.end), 3),
                    "distance": None if "distance" not in hits else round(float(h.distance), 4),
                    "score": None if "score" not in hits else _finite(h.score),
                    "labels": verdicts.get(int(h.row), {}),
                }
                for h in hits.itertuples()
            ],
        }

    def segment(self, row: int) -> tuple[np.ndarray, int]:
        """The audio of indexed window ``row``, read from its file."""
        with self.lock:
            window = self.index.windows([row]).iloc[0]
        try:
            return read_segment(window["file"], float(window["start"]), float(window["end"]))
        except AudioError as err:
            raise SearchError(f"window {row}: {err}") from None


def _session(request: Request) -> LabelSession:
    return request.app.state.session


Session = Annotated[LabelSession, Depends(_session)]
#: The page's API; every route reaches the index through the app's :class:`LabelSession`.
router = APIRouter()


@router.get("/", include_in_schema=False, response_class=HTMLResponse)
def page() -> HTMLResponse:
    return HTMLResponse((STATIC / "label.html").read_text(encoding="utf-8"))


@router.get("/api/state")
def state(session: Session) -> dict[str, Any]:
    index = session.index
    with session.lock:
        files = index.files()
        counts = index.db.execute(
            "SELECT label, SUM(verdict), SUM(1 - verdict) FROM labels GROUP BY label ORDER BY label"
        ).fetchall()
        return {
            "index": str(index.folder),
            "embedder": str(index.embedder),
            "files": len(files),
            "windows": index.count,
            "hours": round(float(files["duration"].sum()) / 3600, 4),
            "window_seconds": index.embedder.window_seconds,
            "labels": [{"label": n, "yes": int(y), "no": int(no)} for n, y, no in counts],
        }


@router.post("/api/search", dependencies=[Depends(_json_only)])
def search_json(body: SearchRequest, session: Session) -> dict[str, Any]:
    index = session.index
    with session.lock:
        if (body.row is None) == (body.label is None):
            raise SearchError("search by a window (row) or by a label (one of them)")
        if body.label is not None:
            query = label_query(index, body.label)
        else:
            assert body.row is not None
            window = index.windows([body.row]).iloc[0]
            query = clip_query(index, window["file"], window["start"], window["end"])
        return session.hits_json(nearest(index, query, body.top), query.note, query.source)


@router.post("/api/search/upload")
async def search_upload(
    request: Request, session: Session, top: Annotated[int, Query(ge=1, le=200)] = 20
) -> dict[str, Any]:
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > MAX_QUERY_BYTES:
            raise SearchError(f"the query is over {MAX_QUERY_BYTES // 1_000_000} MB")
    if not data:
        raise SearchError("send the query clip as the request body")

    def run() -> dict[str, Any]:
        with session.lock:
            query = clip_query(session.index, bytes(data), classifier=session.embedder())
            return session.hits_json(nearest(session.index, query, top), query.note, "upload")

    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(run)


@router.get("/api/window/{row}/audio")
def window_audio(row: int, session: Session) -> Response:
    import soundfile as sf

    samples, rate = session.segment(row)
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="PCM_16")
    return Response(out.getvalue(), media_type="audio/wav")


@router.get("/api/window/{row}/image")
def window_image(row: int, session: Session) -> Response:
    import soxr

    from .config import FeatureConfig
    from .features import Featuriser
    from .images import spectrogram_image

    samples, rate = session.segment(row)
    if rate != THUMBNAIL_RATE:
        samples = soxr.resample(samples, rate, THUMBNAIL_RATE).astype(np.float32)
    features = FeatureConfig(sample_rate=THUMBNAIL_RATE)
    db = Featuriser(features).log_mels([samples])[0]
    out = io.BytesIO()
    spectrogram_image(db, features.floor_db, size=None).save(out, format="PNG")
    return Response(out.getvalue(), media_type="image/png")


@router.post("/api/label", dependencies=[Depends(_json_only)])
def label(body: LabelRequest, session: Session) -> dict[str, Any]:
    with session.lock:
        event = session.index.label(body.row, body.label, body.verdict)
        return {"event": event, "row": body.row, "verdict": body.verdict}


@router.post("/api/undo", dependencies=[Depends(_json_only)])
def undo(session: Session) -> dict[str, Any]:
    with session.lock:
        return {"undone": session.index.undo()}


@router.post("/api/train", dependencies=[Depends(_json_only)])
def train(session: Session) -> dict[str, Any]:
    from .labelling import train_heads

    with session.lock:
        heads = train_heads(session.index)
    return {"reports": [r.__dict__ for r in heads.reports]}


@router.get("/api/suggest")
def suggest_windows(
    session: Session,
    label: Annotated[str, Query(max_length=200)],
    strategy: Annotated[str, Query(pattern="^(margin|top|random)$")] = "margin",
    count: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    from .labelling import suggest

    with session.lock:
        picks = suggest(session.index, label, count, strategy)
        return session.hits_json(picks, source=f"suggestions ({strategy}) for {label!r}")


async def _bad_input(_request: Request, err: Exception) -> JSONResponse:
    return JSONResponse({"error": "bad request", "detail": str(err)}, status_code=400)


def create_label_app(
    index_folder: str | os.PathLike,
    settings: ServeConfig | None = None,
    token: str | None = None,
) -> FastAPI:
    """The page's app over the index at ``index_folder`` (:class:`LabelSession`)."""
    settings = settings or ServeConfig()
    session = LabelSession(index_folder)
    app = FastAPI(title="soundsight label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.session = session
    app.add_middleware(TokenMiddleware, token=token)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(_allowed_hosts(settings)))
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_exception_handler(SoundsightError, _bad_input)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")  # page.css
    return app


def _finite(value: float) -> float | None:
    return round(float(value), 4) if np.isfinite(value) else None


def serve_labelling(
    index_folder: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8001,
    allowed_hosts: list[str] | None = None,
) -> None:
    """Serve the labelling page until interrupted; on a non-loopback ``host`` with a
    token, printed with the page's address."""
    import uvicorn

    settings = ServeConfig(allowed_hosts=tuple(allowed_hosts) if allowed_hosts else None)
    settings = replace(settings, allowed_hosts=_allowed_hosts(settings, host))
    token = None if is_loopback(host) else secrets.token_urlsafe(24)
    app = create_label_app(index_folder, settings, token)
    address = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    if token is not None:
        print(
            f"labelling page: {address}?token={token}\n"
            f"(reachable from other machines: every request needs this token)",
            file=sys.stderr,
        )
    else:
        print(f"labelling page: {address}", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, host, port, settings)).run()
