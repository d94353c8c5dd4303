"""Hostile data (issue #11): clips hours long, truncated files, labels that look like
numbers, NaN or paths, broken symlinks, damaged cache entries, a full disk, and two
processes writing one report. Each test runs real clips from ../shared/datasets
through the public functions and checks the specific message and that nothing else
was lost."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from soundsight import (
    AudioError,
    CacheError,
    FeatureCache,
    FeatureConfig,
    JobReport,
    SoundsightError,
    export_images,
    load_clip,
    load_dataset,
    log_mel,
    prepare,
)
from soundsight.tables import read_csv

SMALL = FeatureConfig(n_mels=64)
SR = 22050


def link(target: Path, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
    return path


def cut_in_half(source: Path, path: Path) -> Path:
    data = source.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def tmp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ------------------------------------------------------------- long recordings


@pytest.fixture(scope="module")
def ten_hours(tmp_path_factory) -> Path:
    """The issue's file: 10 h of 8 kHz silence as FLAC (917 kB), written in blocks."""
    path = tmp_path_factory.mktemp("long") / "ten_hours.flac"
    block = np.zeros(8000 * 600, np.int16)
    with sf.SoundFile(path, "w", 8000, 1, subtype="PCM_16", format="FLAC") as clip:
        for _ in range(60):
            clip.write(block)
    return path


@pytest.fixture(scope="module")
def long_real(tmp_path_factory, esc_clips) -> Path:
    """50 s of real sound: the 10 ESC sample clips end to end, 44.1 kHz FLAC."""
    path = tmp_path_factory.mktemp("long_real") / "esc_joined.flac"
    waves = [sf.read(p, dtype="float32")[0] for p in esc_clips]
    sf.write(path, np.concatenate(waves), 44100, subtype="PCM_16")
    return path


def test_clip_duration_reads_the_header_only(ten_hours, esc_clips, fsdd_clips):
    from soundsight.audio import clip_duration

    assert clip_duration(ten_hours) == 36000.0
    assert clip_duration(esc_clips[0]) == 5.0
    assert clip_duration(fsdd_clips[0]) == sf.info(fsdd_clips[0]).duration
    with pytest.raises(AudioError, match="file not found") as info:
        clip_duration(fsdd_clips[0].with_name("absent.wav"))
    assert info.value.source.endswith("absent.wav")


def test_prepare_fails_a_clip_over_max_duration_from_its_header_without_decoding(
    tmp_path, ten_hours, fsdd_clips, monkeypatch
):
    """Was: the 10-hour FLAC decoded whole (6 GB of samples), MemoryError at 8 GB."""
    import soundsight.audio

    decoded = []
    decode = soundsight.audio._decode

    def decode_short_only(clip, name, *args, **kwargs):
        assert Path(name) != ten_hours, "the 10-hour clip was decoded"
        decoded.append(str(name))
        return decode(clip, name, *args, **kwargs)

    monkeypatch.setattr(soundsight.audio, "_decode", decode_short_only)
    good = [str(p) for p in fsdd_clips[:4]]
    cache, report = prepare([*good, ten_hours], tmp_path, SMALL, workers=0, progress=False)
    reason = (
        "lasts 36000.0 s (10 h 00 min 00 s), over the limit of 600 s per clip "
        "(prepare's max_duration); not decoded"
    )
    assert len(report.failures) == 1
    assert report.failures[0][0] == str(ten_hours)
    assert report.failures[0][1].startswith(reason)
    assert sorted(decoded) == sorted(good) and report.done == 4
    assert all(p in cache for p in good)
    failures = read_csv(cache.folder / "failures.csv", text=("path", "reason"))
    assert failures.values.tolist() == [[str(ten_hours), report.failures[0][1]]]


def test_max_duration_is_configurable_and_checked(tmp_path, fsdd_clips, esc_clips):
    from soundsight.errors import ConfigError

    clips = [str(fsdd_clips[0]), str(esc_clips[0])]  # under 1 s, and 5 s
    cache, report = prepare(clips, tmp_path, SMALL, workers=0, progress=False, max_duration=4)
    assert report.done == 1 and [p for p, _ in report.failures] == [str(esc_clips[0])]
    assert "lasts 5.0 s (0 h 00 min 05 s), over the limit of 4 s" in report.failures[0][1]
    _, report = prepare(clips, tmp_path, SMALL, workers=0, progress=False, max_duration=None)
    assert (report.done, report.skipped, report.failed) == (1, 1, 0)
    assert esc_clips[0] in cache
    with pytest.raises(ConfigError, match="max_duration must be a positive number"):
        prepare(clips, tmp_path, SMALL, progress=False, max_duration=0)


def test_read_blocks_join_to_load_clip_on_real_clips(esc_clips, fsdd_clips, long_real):
    from soundsight.audio import read_blocks

    for path, block_seconds in ((esc_clips[0], 1.0), (long_real, 3.0), (fsdd_clips[1], 0.1)):
        for rate in (SR, 16000, sf.info(path).samplerate):
            blocks = list(read_blocks(path, rate, block_seconds))
            assert all(b.dtype == np.float32 and b.ndim == 1 and len(b) for b in blocks)
            # each block is one source block resampled, give or take the resampler's delay
            assert max(len(b) for b in blocks) <= 1.05 * block_seconds * rate + 2048
            whole = load_clip(path, rate)
            joined = np.concatenate(blocks)
            assert joined.shape == whole.shape
            np.testing.assert_allclose(joined, whole, atol=1e-6)
    assert len(list(read_blocks(long_real, SR, 3.0))) == 17  # 50 s in blocks of 3 s


def test_read_blocks_errors_name_the_file(tmp_path, make_bad_clips, bad_clip_reasons):
    from soundsight.audio import read_blocks

    for name, path in make_bad_clips(tmp_path).items():
        with pytest.raises(AudioError) as info:
            list(read_blocks(path, SR))
        assert info.value.source == str(path)
        assert bad_clip_reasons[name] in info.value.reason


_PEAK_SCRIPT = """
import sys
from soundsight.audio import load_clip, read_blocks

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(l.split()[1]) for l in lines if l.startswith(field + ":")) / 1024

with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS")
if sys.argv[2] == "blocks":
    samples = sum(len(b) for b in read_blocks(sys.argv[1], 22050, 30.0))
else:
    samples = len(load_clip(sys.argv[1], 22050))
print(samples, status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_read_blocks_memory_does_not_grow_with_the_recording(tmp_path, fsdd_clips):
    """An hour built from real FSDD clips: blocks stay a few MB, the whole is hundreds."""
    path = tmp_path / "hour.wav"
    joined = np.concatenate([sf.read(p, dtype="int16")[0] for p in fsdd_clips])
    ten_minutes = np.resize(joined, 8000 * 600)  # the real clips repeated
    with sf.SoundFile(path, "w", 8000, 1, subtype="PCM_16") as clip:
        for _ in range(6):
            clip.write(ten_minutes)

    def peak_mb(how: str) -> tuple[int, float]:
        result = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(path), how],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        samples, peak = result.stdout.split()
        return int(samples), float(peak)

    block_samples, block_peak = peak_mb("blocks")
    whole_samples, whole_peak = peak_mb("whole")
    assert abs(block_samples - whole_samples) <= 1
    assert whole_peak > 100  # the control: decoding it whole needs its length in memory
    assert block_peak < 40, f"read_blocks peaked at {block_peak:.0f} MB more"


# ------------------------------------------------------------- truncated WAV


def test_truncated_wav_is_prepared_from_what_it_holds_with_a_warning(tmp_path, fsdd_clips):
    """Was: a WAV whose header declares twice the data it holds decoded silently."""
    cut = cut_in_half(fsdd_clips[2], tmp_path / "data" / "cut.wav")
    good = [str(p) for p in fsdd_clips[:5]]
    cache, report = prepare([*good, cut], tmp_path / "cache", SMALL, workers=0, progress=False)
    assert (report.done, report.failed) == (6, 0)
    [(path, warning)] = report.warnings
    full = sf.info(fsdd_clips[2]).duration
    assert path == str(cut)
    assert warning == (
        f"truncated: the header declares {full:.2f} s of audio but the file holds "
        f"{sf.info(cut).duration:.2f} s; the {sf.info(cut).duration:.2f} s present were used"
    )
    assert ", 0 failed, 1 warnings, in " in report.summary("prepared")
    rows = read_csv(cache.folder / "warnings.csv", text=("path", "reason"))
    assert rows.values.tolist() == [[str(cut), warning]]
    # the samples that exist were kept: the features of the first half of the clip
    np.testing.assert_allclose(
        cache.load(cut), log_mel(load_clip(cut, SMALL.sample_rate), SMALL), atol=0.04
    )
    assert all(p in cache for p in good)


# ------------------------------------------------------------- labels


ODD_LABELS = ["NA", "null", "0", "01", "1.0", "None", "nan", "TRUE"]


def test_labels_that_look_like_numbers_or_missing_stay_distinct_strings(
    tmp_path, fsdd_clips, esc_clips, esc_meta, esc50_dir
):
    clips = fsdd_clips[: len(ODD_LABELS)]

    def check(table: pd.DataFrame, expected: list[str]) -> None:
        assert table["label"].notna().all()
        assert all(isinstance(v, str) for v in table["label"])
        assert list(table["label"]) == expected

    # csv layout, with a duplicate row that goes through the duplicates' groupby
    rows = zip([*clips, clips[0]], [*ODD_LABELS, "NA"], strict=True)
    (tmp_path / "labels.csv").write_text(
        "path,label\n" + "".join(f"{path},{label}\n" for path, label in rows)
    )
    with pytest.warns(UserWarning, match="1 duplicate rows dropped"):
        check(load_dataset(tmp_path, "csv", csv="labels.csv"), ODD_LABELS)

    # folder layout: one folder per label
    for label, clip in zip(ODD_LABELS, clips, strict=True):
        link(clip, tmp_path / "folders" / label / clip.name)
    table = load_dataset(tmp_path / "folders")
    assert table.attrs["layout"] == "folder"
    check(table.sort_values("label"), sorted(ODD_LABELS))

    # regex layout: labels from file names
    for label, clip in zip(ODD_LABELS, clips, strict=True):
        link(clip, tmp_path / "named" / f"{label}-take.wav")
    table = load_dataset(tmp_path / "named", "regex", label_regex=r"^(.+)-take")
    check(table.sort_values("label"), sorted(ODD_LABELS))

    # esc50 layout: categories in meta/esc50.csv
    root = tmp_path / "esc"
    meta = esc_meta.head(len(ODD_LABELS)).assign(category=ODD_LABELS)
    (root / "meta").mkdir(parents=True)
    meta.to_csv(root / "meta" / "esc50.csv", index=False)
    for name in meta["filename"]:
        link(esc50_dir / "audio" / name, root / "audio" / name)
    check(load_dataset(root), ODD_LABELS)

    # fsdd: the digit labels stay the strings "0".."9"
    fsdd = load_dataset(fsdd_clips[0].parent.parent, split="test")
    assert sorted(fsdd["label"].unique()) == [str(d) for d in range(10)]


def test_failures_csv_written_by_two_processes_at_once_stays_whole(tmp_path):
    """Was: every writer used the one temporary name failures.tmp, so two processes
    on one cache renamed each other's half-written file, or failed to find it."""
    target = tmp_path / "failures.csv"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)

    def writer(tag: str) -> None:
        report = JobReport(failures=[(f"/data/{tag}/{i}.wav", f"reason {tag}") for i in range(200)])
        barrier.wait()
        for _ in range(150):
            report.write_failures(target)

    processes = [context.Process(target=writer, args=(tag,)) for tag in ("a", "b")]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0, 0]
    rows = read_csv(target, text=("path", "reason"))
    assert len(rows) == 200 and rows["reason"].nunique() == 1
    assert not tmp_files(tmp_path)


# ------------------------------------------------------------- export-images


def test_export_images_labels_never_leave_the_output_folder(tmp_path, fsdd_clips):
    """Was: labels ``../../x`` or an absolute path put PNGs outside --out."""
    out = tmp_path / "work" / "deep" / "images"
    outside = tmp_path / "elsewhere"
    labels = [
        "../../x",
        str(outside),
        "a/b",
        "a_b",
        "..",
        ".",
        "",
        "Dog",
        "dog",
        "café ☕",
        "plain",
        "back\\slash",
    ]
    clips = fsdd_clips[: len(labels)]
    table = pd.DataFrame({"path": [str(p) for p in clips], "label": labels})
    report = export_images(table, out, SMALL, size=32, workers=0, progress=False)
    assert (report.done, report.failed) == (len(labels), 0)

    everywhere = sorted(tmp_path.rglob("*.png"))
    assert len(everywhere) == len(labels)
    assert all(p.resolve().is_relative_to(out.resolve()) for p in everywhere)
    assert all(p.parent.parent == out for p in everywhere)  # one component per label
    mapping = read_csv(out / "label_folders.csv", text=("label", "folder"))
    folders = dict(zip(mapping["label"], mapping["folder"], strict=True))
    assert sorted(folders) == sorted(labels)
    assert len({f.casefold() for f in folders.values()}) == len(labels)  # never shared
    assert folders["café ☕"] == "café ☕" and folders["Dog"] != folders["dog"]
    for label, clip in zip(labels, clips, strict=True):
        with Image.open(out / folders[label] / f"{clip.stem}.png") as image:
            assert image.size == (32, 32)
    # a rerun finds every image where the first run put it
    again = export_images(table, out, SMALL, size=32, workers=0, progress=False)
    assert (again.done, again.skipped) == (0, len(labels))


# ------------------------------------------------------------- full disk


def full_disk_after(monkeypatch, writes: int) -> None:
    """Make ``np.save`` (each cache entry's write) fail with ENOSPC after ``writes``
    writes in each process, as a full disk does: part of the data, then the error."""
    real_save = np.save
    count = {"writes": 0}

    def save(file, array, *args, **kwargs):
        count["writes"] += 1
        if count["writes"] > writes:
            file.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)


@pytest.mark.parametrize("workers", [0, 2])
def test_full_disk_stops_prepare_with_a_summary_and_a_rerun_resumes(
    tmp_path, fsdd_clips, monkeypatch, workers
):
    """Was: every clip failed "cannot write its output", then a raw ENOSPC traceback
    from failures.csv, and a .tmp file left per clip."""
    clips = [str(p) for p in fsdd_clips]  # 20 clips: two chunks, so workers=2 forks
    full_disk_after(monkeypatch, 3)
    with pytest.raises(SoundsightError) as info:  # jobs.DiskFullError
        prepare(clips, tmp_path, SMALL, workers=workers, progress=False)
    cache = FeatureCache(tmp_path, SMALL)
    kept = [p for p in clips if p in cache]
    assert 3 <= len(kept) < len(clips)
    message = str(info.value)
    assert message.startswith(f"{cache.folder}: the disk is full (No space left on device)")
    assert f"{len(kept)} of 20 entries are whole and kept, no partial file is left" in message
    assert f"rerun the same command: it resumes with the {20 - len(kept)} left" in message
    assert not tmp_files(tmp_path)
    for path in kept:
        assert cache.load(path).shape[0] == SMALL.n_mels

    monkeypatch.undo()
    _, report = prepare(clips, tmp_path, SMALL, workers=workers, progress=False)
    assert (report.skipped, report.done, report.failures) == (len(kept), 20 - len(kept), [])


def test_full_disk_stops_export_images_and_keeps_what_was_written(
    tmp_path, fsdd_clips, monkeypatch
):
    real_save = Image.Image.save
    count = {"images": 0}

    def save(self, fp, *args, **kwargs):
        count["images"] += 1
        if count["images"] > 2:
            fp.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    clips = [str(p) for p in fsdd_clips[:5]]
    out = tmp_path / "images"
    with pytest.raises(SoundsightError, match=r"2 of 5 images are whole and kept") as info:
        export_images(clips, out, SMALL, size=32, workers=0, progress=False)
    assert str(info.value).startswith(f"{out}: the disk is full")
    assert len(list(out.rglob("*.png"))) == 2 and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    report = export_images(clips, out, SMALL, size=32, workers=0, progress=False)
    assert (report.skipped, report.done) == (2, 3)


# ------------------------------------------------------------- damaged cache entries


def test_damaged_cache_entries_are_named_and_recomputed(tmp_path, fsdd_clips, esc_clips):
    """Was: a zero-byte or truncated entry counted as done; training then failed with
    "EOF: reading array header" and no file named."""
    clips = [str(p) for p in (*fsdd_clips[:4], *esc_clips[:2])]
    cache, _ = prepare(clips, tmp_path, SMALL, workers=0, progress=False)
    empty, cut, garbage = clips[0], clips[4], clips[2]
    cache.entry(empty).write_bytes(b"")
    data = cache.entry(cut).read_bytes()
    cache.entry(cut).write_bytes(data[: len(data) // 2])
    cache.entry(garbage).write_bytes(b"not numpy at all" * 10)

    assert empty not in cache and cut not in cache and garbage not in cache
    assert all(p in cache for p in clips if p not in (empty, cut, garbage))
    with pytest.raises(CacheError) as info:
        cache.load(empty)
    assert str(info.value) == (
        f"{empty}: its cache entry {cache.entry(empty)} is damaged (empty (0 bytes)); "
        "run prepare again to recompute it"
    )
    with pytest.raises(CacheError, match=r"is damaged \(truncated: \d+ bytes where its header"):
        cache.load(cut)
    with pytest.raises(CacheError, match=r"is damaged \(unreadable \.npy header"):
        cache.load(garbage)

    _, report = prepare(clips, tmp_path, SMALL, workers=0, progress=False)
    assert (report.done, report.skipped, report.failed) == (3, 3, 0)
    assert sorted(p for p, _ in report.warnings) == sorted([empty, cut, garbage])
    assert dict(report.warnings)[empty] == "cache entry was damaged (empty (0 bytes)); recomputed"
    for path in (empty, cut, garbage):
        np.testing.assert_allclose(
            cache.load(path), log_mel(load_clip(path, SMALL.sample_rate), SMALL), atol=0.04
        )


def test_entries_are_flushed_to_disk_before_the_rename(tmp_path, fsdd_clips, monkeypatch):
    calls = []
    real_fdatasync, real_replace = os.fdatasync, os.replace

    def fdatasync(fd):
        calls.append(("flush", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fdatasync(fd)

    def replace(source, target):
        calls.append(("rename", str(source)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "replace", replace)
    prepare([str(p) for p in fsdd_clips[:3]], tmp_path, SMALL, workers=0, progress=False)
    renamed = [(i, path) for i, (what, path) in enumerate(calls) if what == "rename"]
    entries = [(i, path) for i, path in renamed if path.endswith(".tmp") and "/clips/" in path]
    assert len(entries) == 3
    for i, path in entries:  # each entry's own data reached the disk before its rename
        assert ("flush", path) in calls[:i]


# ------------------------------------------------------------- listing folders


def test_audio_files_names_symlink_loops_broken_links_and_duplicates(tmp_path, fsdd_clips):
    from soundsight.layouts import audio_files

    root = tmp_path / "data"
    real = [link(fsdd_clips[0], root / "a" / "one.wav"), link(fsdd_clips[1], root / "b.WAV")]
    link(root / "nowhere.wav", root / "gone.wav")  # dangling
    (root / "self.wav").symlink_to(root / "self.wav")  # a loop on itself
    (root / "a" / "up").symlink_to(root)  # a folder loop
    (root / "c").symlink_to(root / "a")  # the same folder twice
    (root / "notes.txt").write_text("not audio")
    files, skipped = audio_files([root, fsdd_clips[2]])
    assert files == [str(p) for p in sorted(real)] + [str(fsdd_clips[2])]
    reasons = dict(skipped)
    assert sorted(reasons) == sorted(
        str(p) for p in (root / "gone.wav", root / "self.wav", root / "a" / "up", root / "c")
    )
    assert reasons[str(root / "gone.wav")] == (
        f"broken symlink: its target {root / 'nowhere.wav'} does not exist"
    )
    assert reasons[str(root / "self.wav")].startswith("symlink loop")
    assert reasons[str(root / "a" / "up")] == f"symlink loop: leads back to {root}"
    assert reasons[str(root / "c")] == f"folder already listed as {root / 'a'}"

    # a layout over that folder warns, and prepare lists the same in warnings.csv
    with pytest.warns(UserWarning, match=r"4 entries left out because they cannot be listed"):
        table = load_dataset(root, "regex", label_regex=r"^(\w+)\.")
    assert sorted(table.attrs["skipped"]) == sorted(skipped)
    cache, report = prepare(table, tmp_path / "cache", SMALL, workers=0, progress=False)
    assert report.done == 2 and sorted(report.warnings) == sorted(skipped)
    rows = read_csv(cache.folder / "warnings.csv", text=("path", "reason"))
    assert sorted(map(tuple, rows.values.tolist())) == sorted(skipped)


def _audio_files_as(uid: int, gid: int, folder: Path) -> dict:
    """``audio_files([folder])`` in a forked child running as ``uid`` (root reads all)."""
    from soundsight.layouts import audio_files

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                os.setgid(gid)
                os.setuid(uid)
                files, skipped = audio_files([folder])
                outcome = {"files": files, "skipped": skipped}
            except PermissionError:
                outcome = {"error": "cannot drop privileges"}
            except BaseException as err:  # noqa: BLE001 - reported to the parent
                outcome = {"error": f"{type(err).__name__}: {err}"}
            os.write(write_end, json.dumps(outcome).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = json.loads(pipe.read().decode())
    os.waitpid(pid, 0)
    return outcome


def test_unreadable_folder_is_named_not_passed_over(fsdd_clips):
    with tempfile.TemporaryDirectory() as name:  # under /tmp: others may enter it
        folder = Path(name)
        os.chmod(folder, 0o755)
        (folder / "open").mkdir()
        (folder / "open" / "one.wav").write_bytes(fsdd_clips[0].read_bytes())
        (folder / "locked").mkdir()
        (folder / "locked" / "two.wav").write_bytes(fsdd_clips[1].read_bytes())
        for path in (folder / "open", folder / "open" / "one.wav"):
            path.chmod(0o755)
        (folder / "locked").chmod(0)
        try:
            if os.geteuid() == 0:
                try:
                    nobody = pwd.getpwnam("nobody")
                except KeyError:
                    pytest.skip("running as root and there is no 'nobody' user to list as")
                outcome = _audio_files_as(nobody.pw_uid, nobody.pw_gid, folder)
            else:
                from soundsight.layouts import audio_files

                files, skipped = audio_files([folder])
                outcome = {"files": files, "skipped": skipped}
        finally:
            (folder / "locked").chmod(0o755)
        if outcome.get("error") == "cannot drop privileges":
            pytest.skip("running as root without the right to switch user")
        assert outcome == {
            "files": [str(folder / "open" / "one.wav")],
            "skipped": [[str(folder / "locked"), "folder cannot be read (Permission denied)"]],
        }


def test_folder_layout_names_class_folders_it_cannot_enter(tmp_path, fsdd_clips):
    root = tmp_path / "data"
    link(fsdd_clips[0], root / "speech" / "one.wav")
    link(fsdd_clips[1], root / "speech" / "nested" / "two.wav")
    (root / "moved").symlink_to(tmp_path / "was_here")  # a class folder moved away
    link(root / "speech" / "absent.flac", root / "speech" / "lost.flac")
    with pytest.warns(UserWarning, match=r"2 entries left out because they cannot be listed"):
        table = load_dataset(root)
    assert table.attrs["layout"] == "folder"
    assert sorted(table["path"]) == sorted(str(p.resolve()) for p in fsdd_clips[:2])
    assert table.attrs["skipped"] == [
        (str(root / "moved"), f"broken symlink: its target {tmp_path / 'was_here'} does not exist"),
        (
            str(root / "speech" / "lost.flac"),
            f"broken symlink: its target {root / 'speech' / 'absent.flac'} does not exist",
        ),
    ]
