"""Sound-event timelines (soundsight detect): real FSDD digits placed over real ESC-50
ambience at known onsets, found again by a small detector trained on the other side of
both data sets; the events' post-processing; the CLI; sed_eval evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from conftest import sine

from soundsight.detection import (
    DetectConfig,
    Timeline,
    _PooledSpectrogram,
    detect,
    file_timeline,
    find_events,
    timeline,
    tune,
    window_starts,
)
from soundsight.errors import ConfigError
from soundsight.evaluation import event_scores, read_event_annotations
from soundsight.prediction import Classifier
from soundsight.soundscapes import make_soundscape, write_examples

#: ESC-50 classes used as ambience (beds under the events).
AMBIENT = ("rain", "wind", "crickets", "sea_waves", "insects", "crackling_fire")


def _ambient(esc50_dir: Path, side: int) -> list[Path]:
    """Ambient clips of one side (src_file parity): training and test beds never share
    a source recording."""
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    meta = meta[meta["category"].isin(AMBIENT) & (meta["src_file"] % 2 == side)]
    return [esc50_dir / "audio" / name for name in meta["filename"]]


#: The digits the detector knows (a few, so that it trains in a minute).
DIGITS = (1, 4, 7)


def _digits(fsdd_dir: Path, test_side: bool, per_digit: int) -> list[tuple[Path, str]]:
    """Real :data:`DIGITS`: the test side (index 0-4) or the training side, every
    speaker."""
    picked = []
    for digit in DIGITS:
        paths = sorted((fsdd_dir / "recordings").glob(f"{digit}_*.wav"))
        side = [p for p in paths if (int(p.stem.split("_")[2]) < 5) == test_side]
        # Round-robin over speakers, so each digit has several voices.
        side.sort(key=lambda p: (int(p.stem.split("_")[2]), p.name))
        picked += [(p, str(digit)) for p in side[:per_digit]]
    return picked


@pytest.fixture(scope="module")
def detector(tmp_path_factory, fsdd_dir: Path, esc50_dir: Path) -> Path:
    """A digit detector with a ``background`` class: 1-s training clips of
    training-side digits over training-side ambience, and ambience alone."""
    from soundsight import load_dataset
    from soundsight.training import TrainConfig, train

    root = tmp_path_factory.mktemp("detector")
    write_examples(
        root / "clips",
        _digits(fsdd_dir, test_side=False, per_digit=24),
        _ambient(esc50_dir, side=0),
        backgrounds=24,
    )
    # About 100 clips: smaller batches (more steps), higher rates and no masking, so
    # that 15 short epochs learn it (10 left it at 85% on validation on an AMD EPYC, and
    # then it flagged the bed's first seconds as a digit).
    result = train(
        load_dataset(root / "clips", "folder"),
        root / "run",
        config=TrainConfig(
            stage1_epochs=0,
            stage2_epochs=15,
            batch_size=8,
            lr=3e-3,
            body_lr=2e-3,
            freq_masks=0,
            time_masks=0,
        ),
        cache=root / "cache",
        progress=False,
    )
    return result.model_path


@pytest.fixture(scope="module")
def soundscape(tmp_path_factory, fsdd_dir: Path, esc50_dir: Path) -> tuple[Path, pd.DataFrame]:
    """20 s of held-out ambience with 5 test-side digits at known onsets."""
    rng = np.random.default_rng(7)
    digits = _digits(fsdd_dir, test_side=True, per_digit=10)
    chosen = [digits[i] for i in rng.choice(len(digits), 5, replace=False)]
    wave, annotation = make_soundscape(
        _ambient(esc50_dir, side=1), chosen, 20.0, 22050, rng, snr_db=(10.0, 15.0), min_gap=1.5
    )
    path = tmp_path_factory.mktemp("scape") / "scape.wav"
    sf.write(path, wave, 22050, subtype="PCM_16")
    return path, annotation


@pytest.mark.slow
def test_detect_finds_the_onsets_of_digits_placed_in_real_ambience(detector, soundscape):
    path, truth = soundscape
    found = detect(detector, [path], progress=False)
    assert not found.failures
    events = found.events
    assert set(events.columns) == {"filename", "onset", "offset", "event_label", "probability"}
    assert "background" not in set(events["event_label"])
    hits = 0
    for row in truth.itertuples():
        # A detected event over the digit: its onset within 0.35 s, or covering it.
        near = (events["onset"] - row.onset).abs() <= 0.35
        over = (events["onset"] < row.offset) & (events["offset"] > row.onset)
        hits += bool((near | over).any())
    # The detector trains in 15 short epochs: it misses or misplaces some digits, and
    # may split one digit into two events of two labels; a timeline out of step with
    # the audio would find few digits and many events over none.
    assert hits >= 3, (
        f"onsets found for {hits} of 5 digits:\n{events.iloc[:, 1:].to_string()}\ntruth:\n{truth}"
    )
    spurious = sum(
        not (
            ((truth["onset"] - event.onset).abs() <= 0.35)
            | ((truth["onset"] < event.offset) & (truth["offset"] > event.onset))
        ).any()
        for event in events.itertuples()
    )
    assert spurious <= 2, (
        f"{spurious} events over no digit:\n{events.iloc[:, 1:].to_string()}\ntruth:\n{truth}"
    )


@pytest.mark.slow
def test_a_long_file_is_streamed_to_the_same_timeline(detector, soundscape, tmp_path):
    """A recording longer than STREAM_SECONDS goes through the featuriser's block
    stream: its timeline equals the one computed from the whole log-mel."""
    from soundsight.prediction import STREAM_SECONDS, Classifier

    path, _ = soundscape
    wave, rate = sf.read(path, dtype="float32")
    repeats = int(STREAM_SECONDS // (len(wave) / rate)) + 1
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(wave, repeats), rate, subtype="PCM_16")
    classifier = Classifier.load(detector)
    streamed = file_timeline(classifier, long)
    db = classifier.log_mel(long)
    whole = timeline(classifier, db.shape[1], [db])
    assert streamed.duration > STREAM_SECONDS
    np.testing.assert_allclose(streamed.centres, whole.centres)
    np.testing.assert_allclose(streamed.probabilities, whole.probabilities, atol=2e-3)
    assert streamed.spectrogram.shape[1] <= 2000


def _line(probabilities: np.ndarray, labels=("dog", "background"), hop=0.25, window=1.0):
    frames = len(probabilities)
    centres = window / 2 + hop * np.arange(frames)
    return Timeline(
        labels=list(labels),
        centres=centres,
        probabilities=np.asarray(probabilities, np.float32),
        duration=float(centres[-1] + window / 2),
        window_seconds=window,
        spectrogram=np.zeros((4, 1), np.float32),
    )


def test_training_examples_keep_negative_examples_beside_the_beds(fsdd_dir, esc50_dir, tmp_path):
    import soundfile as sf

    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    dog = esc50_dir / "audio" / meta[meta["category"] == "dog"]["filename"].iloc[0]  # 5 s
    events = [*_digits(fsdd_dir, test_side=False, per_digit=1), (dog, "background")]
    write_examples(tmp_path, events, _ambient(esc50_dir, side=0), backgrounds=2, seconds=1.0)
    written = {label: sorted((tmp_path / label).glob("*.wav")) for label in ("1", "background")}
    assert [len(written[label]) for label in written] == [1, 3]  # the negative and 2 beds
    assert {sf.info(path).frames for paths in written.values() for path in paths} == {22050}


def test_training_examples_of_a_long_clip_hold_its_sound_not_its_pauses(esc50_dir, tmp_path):
    # Two knocks 3 s apart: a stretch drawn anywhere is mostly the pause between them.
    rate = 22050
    knock = sine(900.0, 0.3, rate)
    clip = np.concatenate([knock, np.zeros(3 * rate, np.float32), knock])
    path = tmp_path / "knocks.wav"
    sf.write(path, clip, rate)
    write_examples(tmp_path / "examples", [(path, "knock")] * 12, _ambient(esc50_dir, side=0), 0)
    peaks = [np.abs(sf.read(p)[0]).max() for p in (tmp_path / "examples" / "knock").iterdir()]
    # Each example holds a knock, well over the bed (ambience at RMS 0.05 peaks near 0.2).
    assert len(peaks) == 12 and min(peaks) > 0.3


def test_events_are_smoothed_merged_and_short_ones_dropped():
    dog = np.zeros(40)
    dog[4:12] = 0.9  # a long sound: 8 windows, spread 1.75 s, longer than a window
    dog[7] = 0.1  # one dip: the median filter removes it
    dog[20:23] = 0.8  # a short sound: 3 windows overlap on 0.5 s
    dog[25:28] = 0.7  # another, 0.75 s after it (overlaps to overlaps): merged
    probabilities = np.stack([dog, 1 - dog], axis=1)
    line = _line(probabilities)
    settings = DetectConfig(smooth_seconds=0.75, merge_gap=0.8, min_duration=0.1)
    events = find_events(line, settings, [0.5, 0.5])
    assert list(events["event_label"]) == ["dog", "dog"]  # background is never an event
    first, second = events.itertuples()
    assert first.onset == pytest.approx(line.edges[4])
    assert first.offset == pytest.approx(line.edges[12])
    # The short sound: from the last active window's start to the first one's end,
    # joined with its neighbour.
    assert second.onset == pytest.approx(line.centres[22] - 0.5)
    assert second.offset == pytest.approx(line.centres[25] + 0.5)
    assert second.probability == pytest.approx(0.8, abs=1e-4)
    # Without merging: two events; with a long minimum duration: only the long one.
    apart = find_events(line, DetectConfig(merge_gap=0.0), [0.5, 0.5])
    assert len(apart) == 3
    long_only = find_events(line, DetectConfig(min_duration=1.8), [0.5, 0.5])
    assert len(long_only) == 1 and long_only["onset"][0] == pytest.approx(line.edges[4])


def test_thresholds_decide_for_a_model_without_background():
    dog = np.full(12, 0.45)
    dog[5:8] = 0.7
    line = _line(np.stack([dog, 1 - dog], axis=1), labels=("dog", "cat"))
    events = find_events(line, DetectConfig(background=()), [0.6, 0.6])
    assert list(events["event_label"]) == ["dog"]
    assert find_events(line, DetectConfig(background=()), [0.8, 0.8]).empty


def test_window_starts_cover_the_whole_recording():
    starts = window_starts(1000, 86, 22)
    assert starts[0] == 0 and starts[-1] == 1000 - 86
    assert np.all(np.diff(starts) <= 22) and np.all(np.diff(starts) > 0)
    assert list(window_starts(50, 86, 22)) == [0]


def test_pooled_spectrogram_is_the_blockwise_maximum():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(8, 10_007)).astype(np.float32)
    pooled = _PooledSpectrogram(db.shape[1], columns=100)
    blocks = [db[:, i : i + 777] for i in range(0, db.shape[1], 777)]
    assert np.array_equal(np.concatenate(list(pooled.tap(blocks)), axis=1), db)
    width = pooled.width
    expected = np.stack([db[:, i : i + width].max(1) for i in range(0, db.shape[1], width)], axis=1)
    np.testing.assert_array_equal(pooled.result(), expected)
    assert pooled.result().shape[1] <= 100


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"hop_seconds": 0}, "hop_seconds"),
        ({"threshold": 1.5}, "threshold"),
        ({"min_duration": -1}, "min_duration"),
        ({"merge_gap": float("nan")}, "merge_gap"),
        ({"label_thresholds": {"dog": 0.0}}, "label_thresholds: 'dog'"),
        ({"label_thresholds": {"dog": "high"}}, "label_thresholds: 'dog'"),
    ],
)
def test_bad_settings_are_refused(options, words):
    with pytest.raises(ConfigError, match=words):
        DetectConfig(**options)


@pytest.mark.slow
def test_detect_cli_writes_csv_json_and_pictures(detector, soundscape, run_cli, tmp_path):
    path, _ = soundscape
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    out = tmp_path / "events.csv"
    code, stdout, stderr = run_cli(
        "detect", detector, path, broken, "--out", out, "--plot", tmp_path / "pictures"
    )
    assert code == 1, stderr  # one file could not be read; the other was done
    assert "broken.wav" in stderr
    table = pd.read_csv(out, dtype={"event_label": str})
    assert list(table.columns) == ["filename", "onset", "offset", "event_label", "probability"]
    assert len(table) >= 3 and (table["offset"] > table["onset"]).all()
    assert (tmp_path / "pictures" / "scape.png").stat().st_size > 10_000
    code, _, stderr = run_cli("detect", detector, path, "--out", tmp_path / "events.json")
    assert code == 0, stderr
    record = json.loads((tmp_path / "events.json").read_text())
    (only,) = record["files"]
    assert only["duration_s"] == pytest.approx(20.0, abs=0.05)
    assert len(only["events"]) == len(table)


@pytest.mark.slow
def test_the_server_returns_the_timeline_of_an_upload(detector, soundscape):
    from fastapi.testclient import TestClient

    from soundsight.prediction import Classifier
    from soundsight.serving import ServeConfig, create_app

    path, _ = soundscape
    classifier = Classifier.load(detector)
    expected = detect(classifier, [path], progress=False).events
    app = create_app(classifier, ServeConfig(workers=1))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        files = {"file": ("scape.wav", path.read_bytes(), "audio/wav")}
        answer = client.post("/predict?timeline=true", files=files)
        plain = client.post("/predict", files=files)
    assert answer.status_code == 200, answer.text
    events = pd.DataFrame(answer.json()["events"])
    assert list(events["event_label"]) == list(expected["event_label"])
    np.testing.assert_allclose(events["onset"], expected["onset"], atol=0.02)
    assert plain.json()["events"] is None


@pytest.mark.slow
def test_the_page_draws_the_timeline_of_a_dropped_clip(detector, soundscape, chromium):
    """The page at / asks for the timeline and draws one band per event."""
    import threading
    import time

    import uvicorn

    from soundsight.prediction import Classifier
    from soundsight.serving import ServeConfig, create_app

    path, _ = soundscape
    classifier = Classifier.load(detector)
    expected = detect(classifier, [path], progress=False).events
    app = create_app(classifier, ServeConfig(workers=1))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if server.started:
                break
            time.sleep(0.1)
        port = server.servers[0].sockets[0].getsockname()[1]
        page = chromium.new_page()
        page.goto(f"http://127.0.0.1:{port}/", timeout=20_000)
        page.set_input_files("#file-input", str(path))
        page.wait_for_selector("body[data-state=done]", timeout=60_000)
        bands = page.locator("#timeline .band")
        assert bands.count() == len(expected)
        assert sorted(bands.all_text_contents()) == sorted(expected["event_label"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _annotations(tmp_path: Path, rows: str) -> Path:
    (tmp_path / "a.wav").write_bytes(b"")
    csv = tmp_path / "events.csv"
    csv.write_text("filename,onset,offset,event_label\n" + rows)
    return csv


def test_bad_event_annotations_are_named_with_their_rows(tmp_path):
    from soundsight.evaluation import read_event_annotations
    from soundsight.layouts import DatasetError

    csv = _annotations(
        tmp_path,
        "a.wav,1.0,2.0,dog\n"  # line 2: fine
        "a.wav,3.0,2.5,dog\n"  # line 3: onset after offset
        "a.wav,4.0,5.0,unicorn\n"  # line 4: unknown label
        "gone.wav,0.5,1.0,dog\n"  # line 5: missing file
        "a.wav,x,1.0,dog\n",  # line 6: not a number
    )
    with pytest.raises(DatasetError) as caught:
        read_event_annotations(csv, tmp_path, ["dog", "cat"])
    message = str(caught.value)
    assert "line 3: onset 3.0 is after offset 2.5" in message
    assert "line 4: label 'unicorn' unknown to the model" in message
    assert "line 5: audio file" in message and "gone.wav not found" in message
    assert "line 6" in message and "not numbers" in message
    assert "line 2" not in message


def test_event_scores_with_sed_eval_on_a_small_annotated_set():
    """Known answers: one event exactly right, one 0.5 s late, one missed, one false."""
    from soundsight.evaluation import event_scores

    reference = pd.DataFrame(
        [
            ("a.wav", 1.0, 2.0, "dog"),
            ("a.wav", 5.0, 6.0, "cat"),
            ("b.wav", 2.0, 3.0, "dog"),
        ],
        columns=["filename", "onset", "offset", "event_label"],
    )
    estimated = pd.DataFrame(
        [
            ("a.wav", 1.0, 2.0, "dog"),
            ("a.wav", 5.5, 6.5, "cat"),
            ("b.wav", 7.0, 8.0, "cat"),
        ],
        columns=["filename", "onset", "offset", "event_label"],
    )
    scores = event_scores(reference, estimated, ["dog", "cat"], ["a.wav", "b.wav"])
    # Events (200 ms collar): only the first matches; precision 1/3, recall 1/3.
    assert scores["event_f1"] == pytest.approx(1 / 3)
    # Segments of 1 s: reference active (dog 1, cat 5, dog 2 in b), estimated (dog 1,
    # cat 5 and 6, cat 7 in b): 2 of 3 reference segments hit, 2 of 4 estimated right.
    assert scores["segment_f1"] == pytest.approx(2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    per_class = scores["per_class"].set_index("label")
    assert per_class.loc["dog", "event_f1"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_evaluate_cli_scores_detections_on_soundscapes(detector, soundscape, run_cli, tmp_path):
    path, truth = soundscape
    csv = tmp_path / "events.csv"
    truth.assign(filename=path.name)[["filename", "onset", "offset", "event_label"]].to_csv(
        csv, index=False
    )
    code, stdout, stderr = run_cli(
        "evaluate", detector, path.parent, "--events", csv, "--out", tmp_path / "m"
    )
    assert code == 0, stderr
    assert "segment-based (1 s) F1" in stdout
    metrics = json.loads((tmp_path / "m" / "event_metrics.json").read_text())
    assert metrics["files"] == 1
    # The scores are sed_eval's on the events written beside them ...
    labels = pd.read_csv(tmp_path / "m" / "per_class_events.csv")["label"].astype(str).tolist()
    reference = truth.assign(filename=path.name, event_label=truth["event_label"].astype(str))
    written = pd.read_csv(tmp_path / "m" / "events.csv", dtype={"event_label": str})
    again = event_scores(reference, written, labels, [path.name])
    assert again["segment_f1"] == pytest.approx(metrics["segment_f1"])
    assert again["event_f1"] == pytest.approx(metrics["event_f1"])
    # ... and the detector beats guessing every label everywhere. (Its F1 itself moves
    # with the CPU's numerics on one short soundscape: 0.57 on one machine, >= 0.6 on
    # another; benchmarks/bench_timelines.py measures detection on many.)
    everywhere = pd.DataFrame(
        {
            "filename": path.name,
            "onset": 0.0,
            "offset": sf.info(path).duration,
            "event_label": labels,
        }
    )
    guess = event_scores(reference, everywhere, labels, [path.name])
    assert metrics["segment_f1"] >= guess["segment_f1"] + 0.2, (stdout, guess)
    assert metrics["event_f1"] > guess["event_f1"], (stdout, guess)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"filename,onset,offset,event_label\n{path.name},2.0,1.0,1\n")
    code, _, stderr = run_cli("evaluate", detector, path.parent, "--events", bad)
    assert code == 2 and "line 2: onset 2.0 is after offset 1.0" in stderr


def test_tuning_picks_the_best_post_processing_of_the_grid(detector, soundscape, run_cli, tmp_path):
    path, truth = soundscape
    csv = tmp_path / "events.csv"
    truth.assign(filename=path.name)[["filename", "onset", "offset", "event_label"]].to_csv(
        csv, index=False
    )
    labels = Classifier.load(detector).labels
    reference = read_event_annotations(csv, path.parent, labels)
    # Events of 30 s at least: none in a 20-s file, whatever the detector.
    grid = {"threshold": (0.3, 0.5), "smooth_seconds": (0.25, 0.75), "min_duration": (0.1, 30.0)}
    best, table = tune(detector, reference, grid=grid, progress=False, per_label=False)
    assert len(table) == 8 and table["segment_f1"].dropna().is_monotonic_decreasing
    assert (table["label_thresholds"] == "").all() and best.label_thresholds == {}
    # Nothing detected: no score, ranked last.
    assert (
        table["segment_f1"].iloc[4:].isna().all() and (table["min_duration"].iloc[4:] == 30).all()
    )
    top = table.iloc[0]
    assert (best.threshold, best.smooth_seconds) == (top.threshold, top.smooth_seconds)
    assert best.merge_gap == DetectConfig().merge_gap  # left out of the grid: as given
    # Each row scores what detect with its settings finds.
    events_of = [label for label in labels if label != "background"]
    for row in table.iloc[[0, 3]].itertuples():
        settings = DetectConfig(
            threshold=row.threshold,
            smooth_seconds=row.smooth_seconds,
            min_duration=row.min_duration,
        )
        found = detect(detector, [path], settings, progress=False)
        scores = event_scores(
            reference, found.events.assign(filename=path.name), events_of, [path.name]
        )
        assert scores["segment_f1"] == pytest.approx(row.segment_f1, abs=1e-4)
    with pytest.raises(ConfigError, match="only the post-processing fields"):
        tune(detector, reference, grid={"hop_seconds": (0.5,)}, progress=False)
    out = tmp_path / "t"
    code, stdout, stderr = run_cli(
        "evaluate", detector, path.parent, "--events", csv, "--tune", "segment_f1", "--out", out
    )
    assert code == 0, stderr
    assert "best segment_f1" in stdout and "--smooth" in stdout
    per_label = "--label-threshold" in stdout  # the pass's row, where it beat the grid
    assert len(pd.read_csv(out / "tuning.csv")) == 5 * 5 * 4 * 2 + per_label  # the default grid


def test_each_labels_threshold_moves_only_where_that_scores_better():
    from soundsight.detection import _tune_label_thresholds

    labels = ("dog", "cat", "bird", "background")
    probabilities = np.zeros((80, 4), np.float32)  # 20 s at a 0.25-s hop
    probabilities[18:29, 0] = 0.45  # a dog, 5-7.5 s: under the one threshold of 0.5
    probabilities[46:55, 1] = 0.95  # a cat, 12-14 s
    probabilities[4:9, 1] = 0.55  # a false cat, 1.5-2.5 s: over 0.5
    probabilities[:, 3] = 1 - probabilities[:, :3].sum(1)
    line = _line(probabilities, labels=labels)
    reference = pd.DataFrame(
        [("a.wav", 5.0, 7.5, "dog"), ("a.wav", 12.0, 14.0, "cat")],
        columns=["filename", "onset", "offset", "event_label"],
    )

    def overall(trial: DetectConfig) -> dict[str, float]:
        limits = [trial.label_thresholds.get(label, trial.threshold) for label in labels]
        found = find_events(line, trial, limits).assign(filename="a.wav")
        scores = event_scores(reference, found, list(labels[:3]), ["a.wav"])
        return {"segment_f1": scores["segment_f1"], "event_f1": scores["event_f1"]}

    start = DetectConfig(threshold=0.5)
    before = overall(start)["segment_f1"]
    best, row = _tune_label_thresholds(start, labels[:3], overall, "segment_f1", before)
    # The dog's threshold comes down to its level, the cat's goes over its false alarm;
    # the bird, never heard, keeps the one threshold.
    assert best.label_thresholds["dog"] <= 0.4
    assert 0.6 <= best.label_thresholds["cat"] <= 0.9
    assert "bird" not in best.label_thresholds and best.threshold == 0.5
    assert row is not None and row["segment_f1"] > before + 0.3 and row["event_f1"] == 1.0
    assert row["label_thresholds"] == " ".join(
        f"{k}={v:g}" for k, v in best.label_thresholds.items()
    )
    # Nothing better to find: the settings come back as they were, with no row.
    assert _tune_label_thresholds(best, labels[:3], overall, "segment_f1", 1.0) == (best, None)


def test_tuned_flags_printed_for_detect_give_the_tuned_score(
    detector, soundscape, run_cli, tmp_path
):
    path, truth = soundscape
    csv = tmp_path / "events.csv"
    truth.assign(filename=path.name)[["filename", "onset", "offset", "event_label"]].to_csv(
        csv, index=False
    )
    reference = read_event_annotations(csv, path.parent, Classifier.load(detector).labels)
    best, table = tune(detector, reference, grid={"smooth_seconds": (0.75,)}, progress=False)
    found = detect(detector, [path], best, progress=False)
    labels = [label for label in Classifier.load(detector).labels if label != "background"]
    scores = event_scores(reference, found.events.assign(filename=path.name), labels, [path.name])
    assert scores["segment_f1"] == pytest.approx(table["segment_f1"].iloc[0], abs=1e-4)
    # The CLI: the flags that tuning prints give evaluate (and detect) that score.
    code, stdout, stderr = run_cli(
        "evaluate", detector, path.parent, "--events", csv, "--tune", "segment_f1"
    )
    assert code == 0, stderr
    summary = next(line for line in stdout.splitlines() if line.startswith("best segment_f1"))
    f1, flags = summary.split()[2], summary.split(": ", 1)[1].split()
    code, stdout, stderr = run_cli("evaluate", detector, path.parent, "--events", csv, *flags)
    assert code == 0, stderr
    assert f"segment-based (1 s) F1 {f1}" in stdout
    # One label's threshold: its events are those of that threshold, the others' those
    # of the one threshold.
    out = tmp_path / "events.csv"
    runs = []
    for flags in (["0.5"], ["1.0"], ["1.0", "--label-threshold", "4=0.5"]):
        code, _, stderr = run_cli("detect", detector, path, "--out", out, "--threshold", *flags)
        assert code == 0, stderr
        runs.append(pd.read_csv(out, dtype={"event_label": str}).drop(columns="filename"))
    half, full, mixed = (
        {k: g.values.tolist() for k, g in run.groupby("event_label")} for run in runs
    )
    assert half["4"] != full.get("4") and mixed["4"] == half["4"]
    assert mixed.get("7") == full.get("7")
    code, _, stderr = run_cli("detect", detector, path, "--label-threshold", "7")
    assert code == 2 and "expected LABEL=PROBABILITY, got '7'" in stderr
    code, _, stderr = run_cli("detect", detector, path, "--label-threshold", "cow=0.5")
    assert code == 2 and "['cow']: the model has no such label" in stderr
