"""export-images: one colour-mapped PNG per clip at the asked size, in label folders,
resumable, with broken clips listed in failures.csv."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from soundsight import FeatureConfig, export_images, load_clip, load_dataset, log_mel, prepare
from soundsight.features import Featuriser, colorize, colour_table
from soundsight.images import image_paths, spectrogram_image

SMALL = FeatureConfig(n_mels=64)


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def test_one_png_per_clip_in_label_folders(tmp_path, fsdd_subset, fsdd_clips):
    table = load_dataset(fsdd_subset)
    out = tmp_path / "images"
    report = export_images(table, out, SMALL, size=96, workers=0, progress=False)
    assert (report.total, report.done, report.skipped, report.failed) == (20, 20, 0, 0)
    written = pngs(out)
    assert [p.relative_to(out) for p in written] == sorted(
        Path(c.name[0]) / f"{c.stem}.png" for c in fsdd_clips
    )
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (96, 96)
            rgb = image.convert("RGB")
            assert len(rgb.getcolors(96 * 96)) > 50  # a spectrogram, not a flat fill
            # every pixel is a colour of the colour map (no blends between its colours)
            colours = {tuple(c) for c in colour_table("magma")}
            assert {c for _, c in rgb.getcolors(96 * 96)} <= colours
    with open(out / "failures.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [["path", "reason"]]


def test_image_is_the_colour_mapped_log_mel(tmp_path, fsdd_clips):
    clip = fsdd_clips[4]
    out = tmp_path / "images"
    export_images([clip], out, SMALL, size=128, workers=0, progress=False)
    assert pngs(out) == [out / f"{clip.stem}.png"]  # unlabelled: no label folder
    # The featuriser's log-mel: librosa's (tests/test_features.py) at the cache's
    # float16 precision, whether or not a cache is used.
    expected = spectrogram_image(Featuriser(SMALL)(clip), SMALL.floor_db, 128)
    with Image.open(out / f"{clip.stem}.png") as image:
        np.testing.assert_array_equal(
            np.asarray(image.convert("RGB")), np.asarray(expected.convert("RGB"))
        )


def test_unresized_image_is_frames_wide_and_mels_high(fsdd_clips):
    db = log_mel(load_clip(fsdd_clips[0], SMALL.sample_rate), SMALL)
    image = spectrogram_image(db, SMALL.floor_db, size=None)
    assert image.size == (db.shape[1], SMALL.n_mels)
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), colorize(db, SMALL.floor_db))


def test_palette_png_reads_as_the_rgb_colour_map_in_other_readers(tmp_path, esc_clips):
    """Users load the PNGs with torchvision or fastai (PIL .convert("RGB")): both see RGB."""
    from torchvision.io import ImageReadMode, read_image

    db = log_mel(load_clip(esc_clips[0], SMALL.sample_rate), SMALL)
    spectrogram_image(db, SMALL.floor_db, size=None).save(tmp_path / "clip.png")
    pixels = read_image(str(tmp_path / "clip.png"), ImageReadMode.RGB).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pixels, colorize(db, SMALL.floor_db))


def test_rerun_skips_existing_images(tmp_path, esc_subset):
    table = load_dataset(esc_subset)
    out = tmp_path / "images"
    export_images(table, out, SMALL, size=64, workers=0, progress=False)
    before = {p: p.stat().st_mtime_ns for p in pngs(out)}
    removed = next(iter(before))
    removed.unlink()
    report = export_images(table, out, SMALL, size=64, workers=0, progress=False)
    assert (report.total, report.done, report.skipped) == (10, 1, 9)
    after = {p: p.stat().st_mtime_ns for p in pngs(out)}
    assert after.keys() == before.keys()
    assert all(after[p] == before[p] for p in before if p != removed)


def test_export_reads_prepared_log_mels_instead_of_decoding(tmp_path, esc_subset, monkeypatch):
    import soundsight.cache

    table = load_dataset(esc_subset)
    prepared = table.iloc[:7]
    prepare(prepared, tmp_path / "cache", SMALL, workers=0, progress=False)
    fresh = tmp_path / "fresh"
    export_images(table, fresh, SMALL, size=64, workers=0, progress=False)

    decoded = []

    read_clip = soundsight.cache.read_clip

    def recording_read_clip(path, *args, **kwargs):
        decoded.append(path)
        return read_clip(path, *args, **kwargs)

    monkeypatch.setattr(soundsight.cache, "read_clip", recording_read_clip)
    out = tmp_path / "from_cache"
    report = export_images(
        table, out, SMALL, size=64, workers=0, progress=False, cache=tmp_path / "cache"
    )
    assert (report.done, report.failed) == (10, 0)
    assert sorted(decoded) == sorted(table["path"].iloc[7:])  # only the clips not prepared
    assert report.audio_seconds == pytest.approx(50.0, abs=0.1)  # 10 clips of 5 s
    for png in pngs(fresh):
        with Image.open(png) as a, Image.open(out / png.relative_to(fresh)) as b:
            # the cache keeps float16 dB: a pixel may land one colour-map step away
            difference = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
            assert difference.max() <= 1


def test_bad_clips_go_to_failures_csv(tmp_path, fsdd_clips, make_bad_clips, bad_clip_reasons):
    root = tmp_path / "data"
    for clip in fsdd_clips[:3]:
        (root / "speech").mkdir(parents=True, exist_ok=True)
        (root / "speech" / clip.name).symlink_to(clip)
    bad = make_bad_clips(root / "broken")
    out = tmp_path / "images"
    report = export_images(load_dataset(root), out, SMALL, size=32, workers=0, progress=False)
    assert report.done == 4  # 3 clips + the WAV cut in half
    assert report.failed == len(bad)
    with open(out / "failures.csv", newline="", encoding="utf-8") as handle:
        rows = {r["path"]: r["reason"] for r in csv.DictReader(handle)}
    assert sorted(rows) == sorted(str(p) for p in bad.values())
    for name, path in bad.items():
        assert bad_clip_reasons[name] in rows[str(path)]
        assert not (out / "broken" / f"{path.stem}.png").exists()
    assert (out / "broken" / "truncated_ok.png").is_file()


def test_unicode_labels_become_folders(tmp_path, fsdd_clips, run_cli):
    labels = ["Bass drum", "café ☕"]
    pd.DataFrame({"path": [str(p) for p in fsdd_clips[:2]], "label": labels}).to_csv(
        tmp_path / "labels.csv", index=False, encoding="utf-8"
    )
    out = tmp_path / "images"
    code, stdout, _ = run_cli(
        "export-images",
        tmp_path,
        "--layout",
        "csv",
        "--csv",
        "labels.csv",
        "--out",
        out,
        "--size",
        "48",
        "--n-mels",
        "64",
        "--workers",
        "0",
    )
    assert code == 0
    assert "exported 2 clips" in stdout
    assert pngs(out) == sorted(
        out / label / f"{p.stem}.png" for label, p in zip(labels, fsdd_clips[:2], strict=True)
    )
    with Image.open(out / "café ☕" / f"{fsdd_clips[1].stem}.png") as image:
        assert image.size == (48, 48)


def test_colliding_clip_names_get_their_folder_name(tmp_path, fsdd_clips, esc_clips):
    for sub, clip in (("a", fsdd_clips[0]), ("b", fsdd_clips[1])):
        (tmp_path / "data" / "dog" / sub).mkdir(parents=True)
        (tmp_path / "data" / "dog" / sub / "take.wav").write_bytes(clip.read_bytes())
    out = tmp_path / "images"
    report = export_images(
        load_dataset(tmp_path / "data"), out, SMALL, size=32, workers=0, progress=False
    )
    assert report.done == 2
    assert pngs(out) == [out / "dog" / "b_take.png", out / "dog" / "take.png"]


@pytest.mark.parametrize("size", [1, 299])
def test_any_size(tmp_path, fsdd_clips, size):
    export_images([fsdd_clips[0]], tmp_path, SMALL, size=size, workers=0, progress=False)
    with Image.open(tmp_path / f"{fsdd_clips[0].stem}.png") as image:
        assert image.size == (size, size)


def test_output_paths_of_a_large_dataset_are_quick(tmp_path):
    """Naming 20,000 images must not compare every name with every other (minutes)."""
    table = pd.DataFrame(
        {"path": [f"/data/{i % 7}/clip{i}.wav" for i in range(20_000)], "label": "x"}
    )
    start = time.perf_counter()
    targets = image_paths(table, tmp_path)
    assert time.perf_counter() - start < 5.0
    assert len(set(targets.values())) == 20_000
