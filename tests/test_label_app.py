"""The labelling page (soundsight label): its API over a real index, its security, and
a label clicked in Chromium surviving a restart."""

from __future__ import annotations

import io
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from soundsight.aisfx import wheel_path
from soundsight.label_app import TOKEN_HEADER, create_label_app
from soundsight.search import Index, build_index
from soundsight.serving import SECURITY_HEADERS, ServeConfig

pytestmark = pytest.mark.skipif(
    not wheel_path().is_file(), reason="aisfx weights missing: python -m soundsight.weights"
)


@pytest.fixture(scope="module")
def built(tmp_path_factory, esc_clips, fsdd_clips) -> Path:
    """An index of three real ESC clips and four FSDD clips (copy it to change it)."""
    out = tmp_path_factory.mktemp("label_index") / "idx"
    build_index([*esc_clips[:3], *fsdd_clips[:4]], out, progress=False)
    return out


@pytest.fixture
def folder(built, tmp_path) -> Path:
    target = tmp_path / "idx"
    shutil.copytree(built, target)
    return target


@pytest.fixture
def client(folder) -> TestClient:
    return TestClient(create_label_app(folder), base_url="http://127.0.0.1")


def test_search_by_window_label_and_undo_commit_at_once(client, folder):
    state = client.get("/api/state").json()
    assert state["files"] == 7 and state["windows"] > 7 and "aisfx" in state["embedder"]
    found = client.post("/api/search", json={"row": 2, "top": 5}).json()
    # Overlapping windows that share their loudest moment have equal (max-pooled)
    # embeddings: the window itself is among the hits at distance 0, first of them.
    tied = [h["row"] for h in found["hits"] if h["distance"] < 1e-4]
    assert 2 in tied and found["hits"][0]["distance"] < 1e-4
    answer = client.post("/api/label", json={"row": 2, "label": "dog", "verdict": "yes"})
    assert answer.status_code == 200
    assert Index(folder).labels("dog")["row"].tolist() == [2]  # already in SQLite
    client.post("/api/label", json={"row": 3, "label": "dog", "verdict": "no"})
    assert client.post("/api/undo", json={}).json()["undone"]["row"] == 3
    by_label = client.post("/api/search", json={"label": "dog", "top": 3}).json()
    assert by_label["hits"][0]["row"] == 2 and by_label["hits"][0]["labels"] == {"dog": 1}
    assert client.get("/api/state").json()["labels"] == [{"label": "dog", "yes": 1, "no": 0}]


def test_window_audio_and_image_are_exactly_that_window(client, folder):
    index = Index(folder)
    window = index.windows([4]).iloc[0]
    audio = client.get("/api/window/4/audio")
    assert audio.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(audio.content))
    assert len(samples) / rate == pytest.approx(window["end"] - window["start"], abs=1e-3)
    original, _ = sf.read(window["file"], start=round(window["start"] * rate), frames=len(samples))
    mono = original.mean(-1) if original.ndim > 1 else original
    assert np.abs(samples - mono).max() < 1e-3
    image = client.get("/api/window/4/image")
    assert image.headers["content-type"] == "image/png" and image.content[:4] == b"\x89PNG"
    for name, value in SECURITY_HEADERS.items():
        assert image.headers[name] == value


def test_upload_query_is_padded_and_says_so(client, fsdd_clips):
    answer = client.post(
        "/api/search/upload?top=3",
        content=fsdd_clips[1].read_bytes(),
        headers={"content-type": "application/octet-stream"},
    ).json()
    assert "padded" in answer["note"] and answer["hits"][0]["name"] == fsdd_clips[1].name


@pytest.mark.parametrize("label", [5, "", "  ", None, ["x"], "a\tb"])
def test_bad_labels_are_refused(client, folder, label):
    answer = client.post("/api/label", json={"row": 1, "label": label, "verdict": "yes"})
    assert answer.status_code in (400, 422) and "label" in answer.text
    assert Index(folder).labels().empty


def test_page_loads_only_its_own_files(client):
    html = client.get("/").text
    assert 'href="/static/page.css"' in html and "<script>" in html
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.I), "external URL"
    assert client.get("/static/page.css").headers["content-type"].startswith("text/css")


def test_clicks_must_be_json_and_hosts_checked(client, folder):
    form = client.post("/api/label", data={"row": "1", "label": "dog", "verdict": "yes"})
    assert form.status_code in (400, 422)
    assert Index(folder).labels().empty
    assert client.get("/api/state", headers={"host": "evil.example"}).status_code == 400


def test_a_token_guards_every_request_when_there_is_one(folder):
    app = create_label_app(folder, ServeConfig(allowed_hosts=("*",)), token="sesame")
    client = TestClient(app, base_url="http://10.0.0.5")
    assert client.get("/").status_code == 401
    assert client.get("/api/window/1/audio").status_code == 401
    assert client.get("/api/state", headers={TOKEN_HEADER: "wrong"}).status_code == 401
    assert client.get("/api/state", headers={TOKEN_HEADER: "sesame"}).status_code == 200
    assert client.get("/?token=sesame").status_code == 200


def test_train_and_suggest(client):
    for row in (0, 1, 2):
        client.post("/api/label", json={"row": row, "label": "rain", "verdict": "yes"})
    for row in (10, 11, 12):
        client.post("/api/label", json={"row": row, "label": "rain", "verdict": "no"})
    reports = client.post("/api/train", json={}).json()["reports"]
    assert reports[0]["label"] == "rain" and reports[0]["folds"] >= 2
    picks = client.get("/api/suggest", params={"label": "rain", "strategy": "margin"}).json()
    rows = [h["row"] for h in picks["hits"]]
    assert len(rows) == len(set(rows)) > 0 and not {0, 1, 2, 10, 11, 12} & set(rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_label_clicked_in_chromium_survives_a_restart(chromium, folder):
    port = _free_port()
    command = [sys.executable, "-m", "soundsight.cli", "label", str(folder), "--port", str(port)]

    def start() -> subprocess.Popen:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=1)
                return process
            except OSError:
                time.sleep(0.2)
        process.kill()
        raise AssertionError(process.stderr.read().decode() if process.stderr else "no start")

    server = start()
    try:
        page = chromium.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("text=embedded with").wait_for(timeout=10_000)
        page.fill("#label", "dog")
        query = Index(folder).windows([5]).iloc[0]["file"]
        page.set_input_files("#query-file", str(query))  # search like this clip
        page.locator("#hits li").first.wait_for(timeout=60_000)
        first_row = int(page.locator("#hits li").first.get_attribute("data-row"))
        page.locator("#hits li").first.locator("button.yes").click()
        page.locator("#status:has-text('(saved)')").wait_for(timeout=10_000)
        page.locator("#hits li.is-yes").wait_for(timeout=10_000)
        page.keyboard.press("n")  # the next hit (now current): is not dog
        page.locator("#hits li.is-no").wait_for(timeout=10_000)
        second_row = int(page.locator("#hits li").nth(1).get_attribute("data-row"))
        image = page.locator("#hits li img").first
        image.scroll_into_view_if_needed()
        page.wait_for_function(
            "() => { const i = document.querySelector('#hits li img');"
            " return i.complete && i.naturalWidth > 0; }",
            timeout=20_000,
        )
        assert not errors
    finally:
        server.terminate()
        server.wait(timeout=30)
    server = start()  # the clicks are in the index, whoever reads it next
    try:
        index = Index(folder)
        assert index.labels("dog").set_index("row")["verdict"].to_dict() == {
            first_row: 1,
            second_row: 0,
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_label_off_loopback_prints_a_token_and_needs_it(folder):
    port = _free_port()
    command = [sys.executable, "-m", "soundsight.cli", "label", str(folder), "--host", "0.0.0.0"]
    command += ["--port", str(port), "--allowed-host", "127.0.0.1"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        match = re.search(r"\?token=(\S+)", line)
        assert match, line
        base = f"http://127.0.0.1:{port}/api/state"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base, timeout=1)
                raise AssertionError("answered without the token")
            except urllib.error.HTTPError as err:
                assert err.code == 401
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        with urllib.request.urlopen(f"{base}?token={match[1]}", timeout=5) as answer:
            assert answer.status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
