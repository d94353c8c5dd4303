"""Search by example: the index (incremental, resumable after kill -9), search, labels,
heads and suggestions, export-labels, on real ESC-50 and FSDD clips."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from soundsight import detection
from soundsight.aisfx import wheel_path
from soundsight.layouts import load_dataset
from soundsight.search import (
    DATABASE,
    VECTORS,
    Embedder,
    Index,
    SearchError,
    build_index,
    check_label,
    export_labels,
    search,
)

RATE = 44100
#: ESC clips and FSDD clips in the long recording, in this order.
ESC_IN_LONG = 6
FSDD_IN_LONG = 16

pytestmark = pytest.mark.skipif(
    not wheel_path().is_file(), reason="aisfx weights missing: python -m soundsight.weights"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _at_rate(path: Path) -> np.ndarray:
    wave, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = wave.mean(1)
    return wave if rate == RATE else soxr.resample(wave, rate, RATE).astype(np.float32)


@pytest.fixture(scope="module")
def audio(tmp_path_factory, esc_clips, fsdd_clips) -> dict:
    """A long recording made of real clips (ESC then FSDD, their spans known), three
    FSDD clips as files of their own, and a file that is not audio."""
    root = tmp_path_factory.mktemp("search_audio")
    parts, spans, at = [], [], 0.0
    for path in [*esc_clips[:ESC_IN_LONG], *fsdd_clips[:FSDD_IN_LONG]]:
        wave = _at_rate(path)
        parts.append(wave)
        spans.append((path, at, at + len(wave) / RATE))
        at += len(wave) / RATE
    long = root / "long.wav"
    sf.write(long, np.concatenate(parts), RATE)
    singles = []
    for path in fsdd_clips[FSDD_IN_LONG : FSDD_IN_LONG + 3]:
        singles.append(root / "singles" / path.name)
        singles[-1].parent.mkdir(exist_ok=True)
        shutil.copy(path, singles[-1])
    broken = root / "broken.wav"
    broken.write_text("not audio at all\n" * 40)
    return {"long": long, "spans": spans, "singles": singles, "broken": broken, "root": root}


@pytest.fixture(scope="module")
def built(tmp_path_factory, audio) -> Path:
    """An index of the long recording and two single clips (read-only: copy to change)."""
    out = tmp_path_factory.mktemp("index") / "idx"
    report = build_index(
        [audio["long"], *audio["singles"][:2], audio["broken"]], out, progress=False
    )
    assert [p for p, _ in report.failures] == [str(audio["broken"])]
    assert len(report.added) == 3
    return out


def _copy(index: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(index, target)
    return target


def test_index_windows_cover_each_file_at_half_window_hop(built, audio):
    index = Index(built)
    files = index.files().set_index("path")
    info = index.embedder
    assert (info.kind, info.name, info.dim) == ("backbone", "aisfx", 512)
    assert info.hop_seconds == pytest.approx(info.window_seconds / 2, abs=0.02)
    long = index.rows_of(audio["long"])
    duration = files.loc[str(audio["long"].resolve()), "duration"]
    assert duration == pytest.approx(audio["spans"][-1][2], abs=0.05)
    steps = np.diff(long["start"].to_numpy())
    assert steps[:-1] == pytest.approx(info.hop_seconds, abs=1e-6)
    assert long["start"].iloc[0] == 0 and long["end"].iloc[-1] == pytest.approx(duration)
    # A clip shorter than a window is one (padded) window over the whole clip.
    single = index.rows_of(audio["singles"][0])
    assert len(single) == 1 and single["start"].iloc[0] == 0
    assert index.count == len(index.vectors()) == sum(files["rows"])
    index.close()


def test_search_finds_the_querys_own_window_first(built, audio):
    index = Index(built)
    rows = index.rows_of(audio["long"])
    for k in (3, len(rows) // 2, len(rows) - 1):
        window = rows.iloc[k]
        hits, query = search(index, str(audio["long"]), 5, window["start"], window["end"])
        # Overlapping windows sharing their loudest moment embed alike (max pooling):
        # the window is among the hits at distance 0, and those come first.
        assert window["row"] in set(hits.loc[hits["distance"] < 1e-5, "row"])
        assert hits["distance"].iloc[0] == pytest.approx(0, abs=1e-5)
        assert hits["distance"].is_monotonic_increasing
    index.close()


def test_clip_query_is_embedded_padded_and_finds_its_indexed_copy(built, audio, tmp_path):
    outside = tmp_path / "elsewhere.wav"  # not in the index: embedded, not looked up
    shutil.copy(audio["singles"][1], outside)
    hits, query = search(built, str(outside), top=3)
    assert "shorter than" in query.note and "padded" in query.note
    assert hits["file"].iloc[0] == str(audio["singles"][1].resolve())
    assert hits["distance"].iloc[0] < 0.01
    # Bytes (an upload) give the same answer.
    hits_bytes, _ = search(built, outside.read_bytes(), top=3)
    assert hits_bytes["row"].tolist() == hits["row"].tolist()


def test_per_file_search_ranks_whole_files(built, audio, tmp_path):
    files = Index(built).files()
    # An indexed file is its own nearest file, at distance 0, once: one row per file.
    hits, _ = search(built, str(audio["long"]), top=10, per_file=True)
    assert hits["file"].iloc[0] == str(audio["long"].resolve())
    assert hits["distance"].iloc[0] == pytest.approx(0, abs=1e-5)
    assert hits["file"].is_unique and len(hits) == len(files)
    assert hits["distance"].is_monotonic_increasing
    long = files.set_index("path").loc[str(audio["long"].resolve())]
    assert (hits["start"].iloc[0], hits["end"].iloc[0]) == (0.0, long["duration"])
    assert hits["row"].iloc[0] == long["first_row"]
    # A clip from outside is embedded, and finds the file it is a copy of.
    outside = tmp_path / "elsewhere.wav"
    shutil.copy(audio["singles"][1], outside)
    hits, _ = search(built, str(outside), top=1, per_file=True)
    assert hits["file"].tolist() == [str(audio["singles"][1].resolve())]
    assert hits["distance"].iloc[0] < 0.01
    index = _copy(built, tmp_path)
    Index(index).label(0, "dog", "yes")
    with pytest.raises(SearchError, match="per-file search takes a clip query"):
        search(index, label="dog", per_file=True)


def test_search_of_an_esc_clip_lands_in_its_span(built, audio, esc_clips, tmp_path):
    source, start, end = audio["spans"][2]
    outside = tmp_path / source.name
    shutil.copy(source, outside)
    hits, _ = search(built, str(outside), top=1)
    middle = (hits["start"].iloc[0] + hits["end"].iloc[0]) / 2
    assert hits["file"].iloc[0] == str(audio["long"].resolve())
    assert start - 1 <= middle <= end + 1


def test_index_is_incremental(built, audio, tmp_path):
    out = _copy(built, tmp_path)
    again = build_index([audio["long"], *audio["singles"][:2]], out, progress=False)
    assert (again.added, again.unchanged, again.windows) == ([], 3, 0)
    before = Index(out).count
    more = build_index([audio["root"] / "singles"], out, progress=False)
    assert more.added == [str(audio["singles"][2].resolve())] and more.unchanged == 2
    index = Index(out)
    assert index.count == before + 1
    # A changed file is embedded again; its old rows are dead to search.
    wave, rate = sf.read(audio["singles"][0])
    changed = tmp_path / "changed.wav"
    shutil.copy(audio["singles"][0], changed)
    build_index([changed], out, progress=False)
    sf.write(changed, np.concatenate([wave, wave]), rate)
    redo = build_index([changed], out, progress=False)
    assert redo.replaced == [str(changed.resolve())]
    index = Index(out)
    assert (~index.live()).sum() == 1
    hits, _ = search(index, str(changed), top=index.count)
    assert len(hits) == index.count - 1


def test_streamed_long_file_embeds_like_a_whole_one(built, audio, tmp_path, monkeypatch):
    monkeypatch.setattr(detection, "STREAM_SECONDS", 5.0)  # read the long file in blocks
    out = tmp_path / "streamed"
    build_index([audio["long"]], out, progress=False)
    streamed, whole = Index(out), Index(built)
    rows = whole.rows_of(audio["long"])["row"].to_numpy()
    assert len(streamed.vectors()) == len(rows)
    cosine = np.sum(streamed.vectors() * whole.vectors()[rows], 1) / (
        np.linalg.norm(streamed.vectors(), axis=1) * np.linalg.norm(whole.vectors()[rows], axis=1)
    )
    assert cosine.min() > 0.999


def test_index_resumes_after_kill_9(audio, esc_clips, tmp_path, built):
    files = [audio["long"], *audio["singles"]]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "soundsight.cli", "index", *map(str, files), "--out", str(out)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with sqlite3.connect(out / DATABASE, timeout=1) as db:
                if db.execute("SELECT COUNT(*) FROM files").fetchone()[0] >= 1:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    index = Index(out)
    done = index.count
    assert 1 <= len(index.files()) <= len(files)
    assert (out / VECTORS).stat().st_size >= done * 512 * 4  # maybe a half-written file
    index.close()
    report = build_index(files, out, progress=False)
    assert len(report.added) + report.unchanged == len(files)
    resumed, clean = Index(out), Index(built)
    assert (out / VECTORS).stat().st_size == resumed.count * 512 * 4
    # The long file's vectors equal those of the uninterrupted build.
    mine = resumed.vectors()[resumed.rows_of(audio["long"])["row"].to_numpy()]
    theirs = clean.vectors()[clean.rows_of(audio["long"])["row"].to_numpy()]
    assert np.allclose(mine, theirs, atol=1e-5)


def test_shards_merge_into_one_index(audio, tmp_path):
    files = [audio["long"], *audio["singles"]]
    out = tmp_path / "sharded"
    for shard in range(2):
        build_index(files, out, shard=(shard, 2), progress=False)
    from soundsight.search import merge_shards

    merged = merge_shards(out)
    assert len(merged.added) == len(files)
    index = Index(out)
    assert sorted(index.files()["path"]) == sorted(str(p.resolve()) for p in files)
    assert index.count == sum(index.files()["rows"])
    assert merge_shards(out).unchanged == len(files)  # again: nothing to do


def test_labels_commit_at_once_survive_a_restart_and_undo(built, tmp_path):
    out = _copy(built, tmp_path)
    index = Index(out)
    index.label(3, "dog", "yes")
    index.label(4, "dog", "yes")
    index.label(5, "dog", "no")
    index.label(6, "dog", "skip")
    index.label(4, "dog", "no")  # changed its mind
    # Another process sees every click already (nothing waits for a close).
    with sqlite3.connect(out / DATABASE) as db:
        assert db.execute("SELECT COUNT(*) FROM label_events").fetchone()[0] == 5
    del index  # no close: as if the page were killed
    index = Index(out)
    table = index.labels("dog").set_index("row")["verdict"].to_dict()
    assert table == {3: 1, 4: 0, 5: 0}
    assert index.seen("dog") == {3, 4, 5, 6}
    assert index.undo()["verdict"] == "no"  # the last click: window 4 back to yes
    assert index.labels("dog").set_index("row")["verdict"].to_dict() == {3: 1, 4: 1, 5: 0}
    index.close()


@pytest.mark.parametrize(
    "label", [7, None, "", "   ", "a\nb", "x" * 201, ["dog"], "../dog", "dog/bark", "dog;bark"]
)
def test_bad_labels_are_refused(built, tmp_path, label):
    index = Index(_copy(built, tmp_path))
    with pytest.raises(SearchError, match="label"):
        index.label(0, label, "yes")
    with pytest.raises(SearchError):
        check_label(label)
    assert index.labels().empty


def test_label_query_and_bad_queries(built, tmp_path, audio):
    index = Index(_copy(built, tmp_path))
    with pytest.raises(SearchError, match="no window is labelled 'dog'"):
        search(index, label="dog")
    index.label(7, "dog", "yes")
    hits, query = search(index, label="dog", top=2)
    assert hits["row"].iloc[0] == 7 and query.source == "label 'dog'"
    with pytest.raises(SearchError, match="start < end"):
        search(index, str(audio["long"]), start=3, end=2)


def test_folder_that_is_not_an_index(tmp_path):
    with pytest.raises(SearchError, match="not a soundsight index"):
        Index(tmp_path)
    (tmp_path / DATABASE).write_bytes(b"garbage" * 100)
    with pytest.raises(SearchError, match="not a soundsight index"):
        Index(tmp_path)


def test_another_network_is_refused_naming_both(built, tmp_path, tiny_model):
    out = _copy(built, tmp_path)
    other = Embedder("backbone", "tf_efficientnet_lite0", "tf_efficientnet_lite0", "", 1280, 2, 1)
    with pytest.raises(SearchError, match="aisfx.*tf_efficientnet_lite0"):
        Index.create(out, other)
    with pytest.raises(SearchError, match=r"backbone aisfx.*model file .*model\.safetensors"):
        search(out, str(tmp_path / "x.wav"), model=tiny_model)


def test_heads_and_suggestions(built, audio, tmp_path):
    from soundsight.labelling import load_heads, suggest, train_heads

    index = Index(_copy(built, tmp_path))
    rows = index.rows_of(audio["long"])
    middle = (rows["start"] + rows["end"]) / 2
    speech_from = audio["spans"][ESC_IN_LONG][1]
    esc_rows = rows.loc[middle < speech_from - 1.5, "row"].tolist()
    speech_rows = rows.loc[middle > speech_from + 1.2, "row"].tolist()
    assert len(speech_rows) >= 4
    for row in esc_rows[::3]:
        index.label(row, "sound", "yes")
    for row in speech_rows[::2]:
        index.label(row, "speech", "yes")
    heads = train_heads(index)
    reports = {r.label: r for r in heads.reports}
    assert reports["speech"].folds >= 2 and 0 <= reports["speech"].average_precision <= 1
    assert heads.scores.shape == (index.count, 2)
    assert load_heads(index, fit=False) is not None  # saved for this label state
    seen = index.seen("speech")
    for strategy in ("margin", "top", "random"):
        picked = suggest(index, "speech", 5, strategy, heads=heads)
        assert len(picked) == 5 and not set(picked["row"]) & seen
        assert picked["row"].is_unique
    top = suggest(index, "speech", 3, "top", heads=heads)
    assert top["score"].is_monotonic_decreasing
    index.label(int(top["row"].iloc[0]), "speech", "no")
    assert load_heads(index, fit=False) is None  # labels changed: heads are stale


def test_export_labels_round_trips_into_load_dataset(built, tmp_path):
    index = Index(_copy(built, tmp_path))
    index.label(2, "dog", "yes")
    index.label(9, "=cmd()", "yes")  # a formula-looking label stays itself
    index.label(10, "dog", "no")  # only 'is' windows are exported
    csv = export_labels(index, tmp_path / "dataset")
    table = load_dataset(tmp_path / "dataset", layout="csv", csv=csv.name)
    assert sorted(table["label"]) == ["=cmd()", "dog"]
    windows = index.windows([2, 9]).set_index("row")
    for row, label in ((2, "dog"), (9, "=cmd()")):
        clip = table[table["label"] == label].iloc[0]
        assert clip["group"] == windows.loc[row, "file"]
        seconds = sf.info(clip["path"]).duration
        assert seconds == pytest.approx(
            windows.loc[row, "end"] - windows.loc[row, "start"], abs=1e-3
        )
    assert all(Path(p).parent.name == "clips" for p in table["path"])


def test_cli_index_search_export(run_cli, audio, tmp_path):
    out = tmp_path / "cli-idx"
    code, stdout, stderr = run_cli("index", *audio["singles"], audio["broken"], "--out", out)
    assert code == 1 and "3 files added" in stdout and "broken.wav" in stderr
    outside = tmp_path / "query.wav"  # not in the index: embedded, padded
    shutil.copy(audio["singles"][0], outside)
    code, stdout, stderr = run_cli("search", out, outside, "--top", "2")
    assert code == 0 and audio["singles"][0].name in stdout.splitlines()[1]
    assert "padded" in stderr
    code, stdout, _ = run_cli("search", out, outside, "--per-file")
    assert code == 0 and len(stdout.splitlines()) == 1 + 3  # header + one row per file
    assert audio["singles"][0].name in stdout.splitlines()[1]
    code, _, stderr = run_cli("search", tmp_path, audio["singles"][0])
    assert code == 2 and "not a soundsight index" in stderr
    code, _, stderr = run_cli("search", out, "--label", "nothing")
    assert code == 2 and "no window is labelled 'nothing'" in stderr
