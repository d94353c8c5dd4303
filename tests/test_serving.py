"""The HTTP service (``soundsight serve``): API with real clips, every bad-input case,
the queue bound, a schemathesis run against the app's OpenAPI schema, and the page in
real headless Chromium against a real uvicorn on loopback.

Every request loop here is bounded in count and time, and all traffic stays on
127.0.0.1 (the API tests do not even open a socket: they call the ASGI app in-process).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import CHROMIUM, require_browser
from fastapi.testclient import TestClient
from PIL import Image

from soundsight.features import colorize
from soundsight.prediction import Classifier
from soundsight.serving import ServeConfig, create_app, is_loopback, sniff_audio

REPO = Path(__file__).resolve().parents[1]
#: Base URL of in-process clients: a loopback name, as the app accepts by default.
LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def classifier(tiny_model: Path) -> Classifier:
    return Classifier.load(tiny_model)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(tiny_model):
    """Score with one torch thread, as ``soundsight serve`` does: on 2 shared cores a
    pool of 2 was ~40x slower per clip. Restored after this module.

    Also undoes flush-to-zero in this thread (training sets it): hypothesis, under
    schemathesis, refuses to generate floats while subnormals are flushed.
    """
    import torch

    threads, flushed = torch.get_num_threads(), sys.float_info.min / 2 == 0.0
    torch.set_num_threads(1)
    torch.set_flush_denormal(False)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flushed)


@pytest.fixture(scope="module")
def client(classifier: Classifier):
    app = create_app(classifier, ServeConfig(workers=2, queue_size=4))
    with TestClient(app, base_url=LOCAL) as client:
        yield client


def make_client(classifier, **settings) -> TestClient:
    return TestClient(create_app(classifier, ServeConfig(**settings)), base_url=LOCAL)


def upload(client: TestClient, path: Path, params: dict | None = None, name: str | None = None):
    with open(path, "rb") as handle:
        return client.post(
            "/predict", files={"file": (name or path.name, handle)}, params=params or {}
        )


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error", "detail", "filename"}
    for word in words:
        assert word in body["detail"], body
    return body


# --- happy path ---------------------------------------------------------------------


def test_health_and_labels(client, classifier):
    health = client.get("/health").json()
    assert health["status"] == "ok"
    assert health["labels"] == len(classifier.labels) == 10
    assert health["pending"] == 0 and health["capacity"] == 6 and health["workers"] == 2
    labels = client.get("/labels").json()
    assert labels == {"labels": [str(d) for d in range(10)], "count": 10}


def test_predict_multipart_fsdd_clip_matches_the_python_api(client, classifier, fsdd_clips):
    clip = fsdd_clips[7]
    response = upload(client, clip)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == clip.name
    assert len(body["predictions"]) == 5  # the default top_k
    expected = classifier.predict(clip, top_k=5)
    assert [p["label"] for p in body["predictions"]] == [label for label, _ in expected]
    np.testing.assert_allclose(
        [p["probability"] for p in body["predictions"]], [p for _, p in expected], atol=1e-5
    )
    probabilities = [p["probability"] for p in body["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
    assert body["duration_s"] == pytest.approx(sf.info(clip).duration, abs=1e-3)
    assert body["clip_duration_s"] == pytest.approx(sf.info(clip).duration, abs=1e-3)
    assert body["truncated"] is False and body["notice"] is None
    assert body["processing_ms"] > 0 and body["queue_ms"] >= 0
    assert body["spectrogram_png"] is None


@pytest.mark.parametrize("content_type", ["application/octet-stream", "audio/flac", None])
def test_predict_raw_body_esc_clip(client, esc_clips, content_type):
    clip = esc_clips[0]
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(
        "/predict",
        content=clip.read_bytes(),
        headers=headers,
        params={"filename": clip.name, "top_k": 3},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["filename"] == clip.name
    assert len(body["predictions"]) == 3
    assert body["duration_s"] == pytest.approx(5.0, abs=1e-3)
    assert body["truncated"] is False


def test_spectrogram_png_is_the_models_log_mel(client, classifier, esc_clips):
    clip = esc_clips[1]
    body = upload(client, clip, {"spectrogram": "true", "top_k": 1}).json()
    image = Image.open(io.BytesIO(base64.b64decode(body["spectrogram_png"])))
    assert image.format == "PNG"
    db = classifier.log_mel(clip)
    assert image.size == (db.shape[1], classifier.features.n_mels)
    np.testing.assert_array_equal(
        np.asarray(image.convert("RGB")), colorize(db, classifier.features.floor_db)
    )
    assert len(body["predictions"]) == 1


@pytest.mark.parametrize("top_k", [0, 11, -1, "many"])
def test_top_k_out_of_range_is_422(client, fsdd_clips, top_k):
    assert_error(upload(client, fsdd_clips[0], {"top_k": top_k}), 422, "top_k")


def test_top_k_all_labels(client, fsdd_clips):
    body = upload(client, fsdd_clips[0], {"top_k": 10}).json()
    assert sorted(p["label"] for p in body["predictions"]) == [str(d) for d in range(10)]
    assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1, abs=1e-4)


# --- over-long clips ----------------------------------------------------------------


def test_long_clip_is_analysed_up_to_max_duration_and_says_so(classifier, esc_clips):
    with make_client(classifier, max_duration=2.0) as client:
        body = upload(client, esc_clips[0], {"spectrogram": "true"}).json()
    assert body["truncated"] is True
    assert body["duration_s"] == pytest.approx(2.0, abs=1e-3)
    assert body["clip_duration_s"] == pytest.approx(5.0, abs=1e-3)
    assert body["max_duration_s"] == 2.0
    assert "5.0 s long" in body["notice"] and "first 2 s" in body["notice"]
    frames = classifier.features.num_frames(2 * classifier.features.sample_rate)
    image = Image.open(io.BytesIO(base64.b64decode(body["spectrogram_png"])))
    assert image.size[0] == frames


def test_default_max_duration_is_30_s(client, esc_clips, tmp_path):
    # 35 s of real audio: seven ESC clips end to end.
    waves = [sf.read(clip, dtype="float32")[0] for clip in esc_clips[:7]]
    long_clip = tmp_path / "long.wav"
    sf.write(long_clip, np.concatenate(waves), 44100, subtype="PCM_16")
    body = upload(client, long_clip).json()
    assert body["truncated"] is True
    assert body["duration_s"] == pytest.approx(30.0, abs=1e-3)
    assert body["clip_duration_s"] == pytest.approx(35.0, abs=1e-3)


# --- bad input ----------------------------------------------------------------------


def test_upload_over_20_mb_is_413(client):
    body = assert_error(
        client.post(
            "/predict",
            content=b"\0" * (20_000_000 + 1),
            params={"filename": "huge.wav"},
            headers={"content-type": "application/octet-stream"},
        ),
        413,
        "huge.wav",
        "20 MB",
    )
    assert body["error"] == "payload_too_large"


def test_configured_upload_limit(classifier, fsdd_clips, esc_clips):
    limit = 50_000  # FSDD clips are under it, 5-s ESC FLACs over it
    assert fsdd_clips[3].stat().st_size < limit < esc_clips[0].stat().st_size
    with make_client(classifier, max_upload_bytes=limit) as client:
        assert upload(client, fsdd_clips[3]).status_code == 200
        assert_error(upload(client, esc_clips[0]), 413, esc_clips[0].name, "0.05 MB")
        raw = client.post("/predict", content=esc_clips[0].read_bytes())
        assert_error(raw, 413)

        # No Content-Length (chunked): the cap applies while the body streams in.
        def chunks():
            data = esc_clips[0].read_bytes()
            for start in range(0, len(data), 8192):
                yield data[start : start + 8192]

        streamed = client.post("/predict", content=chunks())
        assert_error(streamed, 413)
        assert client.get("/health").json()["pending"] == 0


#: Expected status of each of conftest's broken clips: 415 when it is not audio at
#: all, 422 when it is audio (or claims to be) but unusable.
BAD_STATUS = {
    "empty.wav": 422,
    "header_only.wav": 422,
    "text.wav": 415,
    "nan.wav": 422,
    "inf.wav": 422,
    "truncated.flac": 422,
}


def test_every_bad_clip_gets_415_or_422_naming_the_upload(
    client, make_bad_clips, bad_clip_reasons, tmp_path
):
    clips = make_bad_clips(tmp_path / "bad")
    assert set(clips) == set(BAD_STATUS)
    for name, path in clips.items():
        body = assert_error(upload(client, path), BAD_STATUS[name], name, bad_clip_reasons[name])
        assert body["filename"] == name
        assert body["error"] == (
            "unsupported_media_type" if BAD_STATUS[name] == 415 else "invalid_audio"
        )
    # The same through the raw-body route.
    raw = client.post("/predict", content=clips["nan.wav"].read_bytes())
    assert_error(raw, 422, "NaN")
    # A WAV cut in half still has its first half: it is analysed, not refused.
    assert upload(client, tmp_path / "bad" / "truncated_ok.wav").status_code == 200


def test_damaged_flac_says_so(client, make_bad_clips, tmp_path):
    path = make_bad_clips(tmp_path / "bad")["truncated.flac"]
    assert_error(upload(client, path), 422, "damaged FLAC file")


@pytest.mark.parametrize(
    "name, data",
    [
        ("picture.png", None),  # filled in below: a real PNG
        ("notes.txt", b"hello, this is not a sound\n" * 10),
        ("random.bin", bytes(range(256)) * 8),
    ],
)
def test_non_audio_is_415(client, name, data):
    if data is None:
        png = io.BytesIO()
        Image.new("RGB", (8, 8)).save(png, format="PNG")
        data = png.getvalue()
    response = client.post("/predict", files={"file": (name, data)})
    assert_error(response, 415, name, "not an audio file")


def test_urlencoded_form_is_415(client):
    assert_error(client.post("/predict", data={"file": "x"}), 415, "multipart/form-data")


def test_multipart_without_file_field_is_422(client, fsdd_clips):
    response = client.post("/predict", files={"sound": ("a.wav", fsdd_clips[0].read_bytes())})
    assert_error(response, 422, "field 'file'")
    response = client.post("/predict", data={"file": "not a file"}, files={"other": ("x", b"x")})
    assert_error(response, 422, "field 'file'")


def test_sniff_audio(fsdd_clips, esc_clips):
    assert sniff_audio(fsdd_clips[0].read_bytes()) == "WAV"
    assert sniff_audio(esc_clips[0].read_bytes()) == "FLAC"
    assert sniff_audio(b"ID3\x04") == "MP3" and sniff_audio(b"\xff\xfb\x90") == "MP3"
    assert sniff_audio(b"OggS\0") == "OGG"
    assert sniff_audio(b"%PDF-1.7") is None and sniff_audio(b"") is None


# --- the queue bound ----------------------------------------------------------------


class GatedClassifier:
    """A classifier whose scoring waits for ``release``: requests stay in the pool."""

    def __init__(self, classifier: Classifier):
        self._classifier = classifier
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._classifier, name)

    def analyse(self, *args, **kwargs):
        assert self.release.wait(60), "test never released the gate"
        return self._classifier.analyse(*args, **kwargs)


def test_full_queue_answers_503_and_admits_no_more(classifier, fsdd_clips):
    gated = GatedClassifier(classifier)
    settings = ServeConfig(workers=1, queue_size=1)  # capacity 2: one running, one waiting
    app = create_app(gated, settings)
    clip = fsdd_clips[5].read_bytes()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as http:

            async def post():
                return await http.post("/predict", content=clip, params={"filename": "c.wav"})

            async def pending() -> int:
                return (await http.get("/health")).json()["pending"]

            admitted = [asyncio.create_task(post()) for _ in range(2)]
            for _ in range(200):  # bounded wait (10 s) for both to be admitted
                if await pending() == 2:
                    break
                await asyncio.sleep(0.05)
            assert await pending() == 2
            refused = await asyncio.wait_for(asyncio.gather(*(post() for _ in range(5))), 30)
            assert await pending() == 2  # refusals hold nothing
            gated.release.set()
            done = await asyncio.wait_for(asyncio.gather(*admitted), 60)
            return refused, done, await pending()

    refused, done, after = asyncio.run(scenario())
    for response in refused:
        body = assert_error(response, 503, "2 requests")
        assert body["error"] == "queue_full"
        assert response.headers["retry-after"] == "1"
    assert [r.status_code for r in done] == [200, 200]
    assert after == 0


def test_abandoned_request_keeps_its_slot_until_its_job_ends(classifier, fsdd_clips):
    gated = GatedClassifier(classifier)
    app = create_app(gated, ServeConfig(workers=1, queue_size=0))
    clip = fsdd_clips[8].read_bytes()

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as http:

            async def pending() -> int:
                return (await http.get("/health")).json()["pending"]

            abandoned = asyncio.create_task(http.post("/predict", content=clip))
            for _ in range(200):  # bounded wait (10 s) for it to reach the worker
                if await pending() == 1:
                    break
                await asyncio.sleep(0.05)
            abandoned.cancel()  # the client goes away; its job is still in the pool
            await asyncio.sleep(0.1)
            held = await pending()
            refused = await http.post("/predict", content=clip)
            gated.release.set()
            for _ in range(200):
                if await pending() == 0:
                    break
                await asyncio.sleep(0.05)
            after = await pending()
            served = await http.post("/predict", content=clip)
            return held, refused, after, served

    held, refused, after, served = asyncio.run(scenario())
    assert held == 1
    assert_error(refused, 503)
    assert after == 0
    assert served.status_code == 200


def test_serve_config_validation():
    with pytest.raises(ValueError):
        ServeConfig(workers=0)
    with pytest.raises(ValueError):
        ServeConfig(max_upload_bytes=0)
    with pytest.raises(ValueError):
        ServeConfig(queue_size=-1)
    settings = ServeConfig()
    assert settings.max_upload_bytes == 20_000_000 and settings.max_duration == 30.0
    assert settings.capacity == settings.workers + settings.queue_size


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert is_loopback("[::1]") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


# --- page, docs, schema -------------------------------------------------------------


def test_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    html = response.text
    for element in ('id="file-input"', 'id="drop-zone"', 'id="spectrogram"', "<audio"):
        assert element in html
    # Nothing fetched from elsewhere: no absolute or protocol-relative URLs at all.
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), "external URL"
    assert client.get("/static/index.html").text == html


def test_openapi_and_offline_docs(client):
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/octet-stream",
    }
    assert {"200", "413", "415", "422", "503"} <= set(predict["responses"])
    assert {"/labels", "/health"} <= set(schema["paths"])
    assert "/" not in schema["paths"]
    for page, script in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        docs = client.get(page)
        assert docs.status_code == 200 and script in docs.text
        assets = re.findall(r"""(?:src|href)=["']?([^"' >]+)""", docs.text)
        assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets)
        for asset in assets:
            assert client.get(asset).status_code == 200, asset


@pytest.fixture(scope="module")
def api_schema(classifier):
    import schemathesis

    # schemathesis calls an ASGI app with the Host 'testserver'.
    settings = ServeConfig(
        workers=2, queue_size=8, max_upload_bytes=200_000, allowed_hosts=("testserver",)
    )
    app = create_app(classifier, settings)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_openapi_schema_conformance(api_schema):
    """Generated requests (valid and invalid) never crash the app, and every answer
    matches the schema: status codes, content types and bodies.

    Drives hypothesis directly with schemathesis' case strategies instead of its pytest
    plugin (``schema.parametrize``), which breaks on pytest 9 (schemathesis 4.32.5:
    ``'Function' object has no attribute '_nodeid'``); this works on pytest 8 and 9.
    """
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /predict", "GET /labels", "GET /health"}
    for operation in operations:
        takes_input = any(
            len(part) for part in (operation.path_parameters, operation.query, operation.body)
        )
        # An operation with no parameters and no body has no invalid request to make.
        for mode in GenerationMode if takes_input else [GenerationMode.POSITIVE]:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=25,
                deadline=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def conforms(case):
                # Schema-valid uploads are arbitrary bytes, which are rightly refused
                # (415/422): 'valid per schema must be accepted' does not hold for a file.
                case.call_and_validate(excluded_checks=[positive_data_acceptance])

            conforms()


def test_real_clip_answers_conform_to_the_schema(api_schema, fsdd_clips, esc_clips):
    """Generated bytes are never valid audio, so the 200 answers are checked here, on
    real clips through both request body types."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    operation = api_schema["/predict"]["POST"]
    cases = [
        operation.Case(
            body=fsdd_clips[2].read_bytes(),
            media_type="application/octet-stream",
            query={"spectrogram": True, "top_k": 2},
        ),
        operation.Case(
            body={"file": esc_clips[2].read_bytes()},
            media_type="multipart/form-data",
            query={"filename": "clip.flac"},
        ),
    ]
    for case in cases:
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
        assert response.status_code == 200, response.text


# --- the page in real Chromium, against `soundsight serve` on loopback ----------------


def test_browser_check_fails_in_ci_and_skips_locally(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="cannot run in CI"):
        require_browser(tmp_path / "no-chromium")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="install-system-deps.sh"):
        require_browser(tmp_path / "no-chromium")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=["torch", "onnx"])
def live_server(request, tiny_model, tmp_path_factory):
    """``soundsight serve`` in a subprocess on a free loopback port, with each runtime
    (the model file, or its export with ``--runtime onnx``); its base URL."""
    model = tiny_model if request.param == "torch" else request.getfixturevalue("tiny_onnx")
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = ["serve", str(model), "--port", str(port), "--runtime", request.param]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "soundsight.cli", *command],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # bounded: until the deadline or the process dies
            assert process.poll() is None, f"server exited: {log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not up in 120 s: {log.read_text()}"
            time.sleep(0.25)
        yield base, process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_server_binds_loopback_by_default(live_server):
    psutil = pytest.importorskip("psutil")
    _, process = live_server
    listening = [
        c.laddr
        for c in psutil.Process(process.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_page_in_chromium_shows_label_spectrogram_and_plays(
    chromium, live_server, fsdd_clips, tmp_path
):
    base, _ = live_server
    chosen, dropped = fsdd_clips[6], fsdd_clips[13]
    expected = {
        clip.name: httpx.post(
            f"{base}/predict",
            files={"file": (clip.name, clip.read_bytes())},
            params={"top_k": 5},
            timeout=60,
        ).json()
        for clip in (chosen, dropped)
    }
    requests, console_errors = [], []
    page = chromium.new_page(viewport={"width": 1000, "height": 900})
    page.set_default_timeout(60_000)
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(f"{base}/")

    # 1. Choose a file with the file input.
    page.set_input_files("#file-input", str(chosen))
    page.wait_for_selector("body[data-state=done]")
    _check_page(page, chosen.name, expected[chosen.name])
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

    # 2. Drag a file onto the drop zone (a real drop event with the file in it).
    page.evaluate("document.body.dataset.state = ''")
    data = base64.b64encode(dropped.read_bytes()).decode()
    page.evaluate(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "audio/wav" }));
            const zone = document.getElementById("drop-zone");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, {
                    dataTransfer: transfer, bubbles: true, cancelable: true,
                }));
            }
        }""",
        [dropped.name, data],
    )
    page.wait_for_selector("body[data-state=done]")
    _check_page(page, dropped.name, expected[dropped.name])

    # 3. A file that is not audio: the page shows the server's message.
    page.set_input_files(
        "#file-input",
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not audio"}],
    )
    page.wait_for_selector("body[data-state=error]")
    assert "not an audio file" in page.inner_text("#error")
    origins = {re.match(r"^([a-z]+:(?://[^/]+)?)", url).group(1) for url in requests}
    assert origins <= {base, "data:", "blob:"}, f"page fetched from elsewhere: {origins}"
    assert not [e for e in console_errors if "notes.txt" not in e and "415" not in e]


def test_page_in_chromium_says_unknown_for_noise_and_names_the_closest_label(
    chromium, live_server, write_audio
):
    base, _ = live_server
    noise = write_audio("noise.wav", 0.3 * np.random.default_rng(0).standard_normal(8000), 8000)
    answer = httpx.post(
        f"{base}/predict", files={"file": (noise.name, noise.read_bytes())}, timeout=60
    ).json()
    assert answer["unknown"] and answer["label"] == "unknown"
    page = chromium.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{base}/")
    page.set_input_files("#file-input", str(noise))
    page.wait_for_selector("body[data-state=done]")
    assert page.inner_text("#top-label") == "unknown"
    assert page.eval_on_selector("#top-label", "el => el.classList.contains('unknown')")
    closest = answer["predictions"][0]["label"]
    assert f"closest: {closest}" in page.inner_text("#unknown-note")
    # The bars still show the known labels' probabilities.
    bars = page.eval_on_selector_all("#predictions li.bar", "els => els.map(e => e.dataset.label)")
    assert bars == [p["label"] for p in answer["predictions"]]


def test_docs_render_offline_in_chromium_under_the_csp(chromium, live_server):
    """Swagger UI and ReDoc, served by fastapi-offline, draw the API under the app's
    Content-Security-Policy, loading nothing from elsewhere. The one thing they try to
    fetch from elsewhere, ReDoc's own 'API docs by Redocly' logo, the CSP blocks."""
    base, _ = live_server
    page = chromium.new_page()
    page.set_default_timeout(60_000)
    loaded, problems = [], []
    page.on("response", lambda r: loaded.append(r.url))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e =>"
        " console.error('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI))"
    )
    response = page.goto(f"{base}/docs")
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.wait_for_selector(".swagger-ui .opblock-summary-path[data-path='/predict']")
    assert "soundsight" in page.inner_text(".swagger-ui .info .title")
    assert not problems, problems
    page.goto(f"{base}/redoc")
    page.wait_for_selector("redoc [data-section-id]")
    assert "Label an audio clip" in page.inner_text("redoc")
    origins = {re.match(r"^([a-z]+:(?://[^/]+)?)", url).group(1) for url in loaded}
    assert origins <= {base, "data:", "blob:"}, f"docs loaded from elsewhere: {origins}"
    logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    assert [p for p in problems if logo not in p] == [], problems
    assert any(p == f"CSP violation: img-src {logo}" for p in problems), problems


def _check_page(page, name: str, expected: dict) -> None:
    assert page.inner_text("#top-label") == expected["label"]  # the label, or "unknown"
    assert page.inner_text("#file-name") == name
    bars = page.eval_on_selector_all(
        "#predictions li.bar", "els => els.map(e => [e.dataset.label, +e.dataset.probability])"
    )
    assert [label for label, _ in bars] == [p["label"] for p in expected["predictions"]]
    np.testing.assert_allclose(
        [p for _, p in bars], [p["probability"] for p in expected["predictions"]], atol=1e-6
    )
    image = page.eval_on_selector(
        "#spectrogram",
        "img => ({src: img.src.slice(0, 22), w: img.naturalWidth, h: img.naturalHeight,"
        " complete: img.complete})",
    )
    assert image["src"] == "data:image/png;base64,"
    assert image["complete"] and image["h"] == 128 and image["w"] > 10, image
    # The spectrogram on the page is the PNG the API made for this clip.
    png = page.eval_on_selector("#spectrogram", "img => img.src.split(',')[1]")
    decoded = Image.open(io.BytesIO(base64.b64decode(png)))
    assert decoded.size == (image["w"], image["h"])
    audio = page.eval_on_selector(
        "#player", "a => ({src: a.src, ready: a.readyState, duration: a.duration})"
    )
    assert audio["src"].startswith("blob:")
    page.wait_for_function("document.getElementById('player').readyState >= 1")
    duration = page.eval_on_selector("#player", "a => a.duration")
    assert duration == pytest.approx(expected["duration_s"], abs=0.05)


def test_cli_serve_refuses_missing_model(run_cli, tmp_path):
    code, _, err = run_cli("serve", tmp_path / "nope.safetensors")
    assert code == 2 and "model file not found" in err


def test_install_script_is_idempotent_when_chromium_is_there():
    if not CHROMIUM.is_file() or shutil.which("bash") is None:
        pytest.skip("needs /usr/bin/chromium")
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "install-system-deps.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "present" in result.stdout
