"""The feature cache: what prepare stores, when it reuses or recomputes entries,
shards, broken clips, and a run killed with SIGKILL part-way through."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from soundsight import (
    CacheError,
    FeatureCache,
    FeatureConfig,
    load_clip,
    load_dataset,
    log_mel,
    prepare,
)

SMALL = FeatureConfig(n_mels=64)  # a non-default config keeps these caches apart


def real_clips(fsdd_clips, esc_clips) -> list[str]:
    return [str(p) for p in [*fsdd_clips, *esc_clips]]


def entries(cache: FeatureCache) -> dict[str, bytes]:
    """Every stored entry, by its path relative to the cache folder, as bytes."""
    return {
        str(p.relative_to(cache.folder)): p.read_bytes()
        for p in sorted(cache.folder.glob("clips/*/*.npy"))
    }


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, fsdd_subset, esc_subset):
    """A cache of the 30 real subset clips (read-only for the tests that share it)."""
    table = pd.concat([load_dataset(fsdd_subset), load_dataset(esc_subset)], ignore_index=True)
    out = tmp_path_factory.mktemp("cache")
    cache, report = prepare(table, out, workers=0, progress=False)
    return table, cache, report


def test_prepare_stores_every_clip_as_float16_log_mel(prepared):
    table, cache, report = prepared
    assert (report.total, report.done, report.skipped, report.failures) == (30, 30, 0, [])
    assert report.audio_seconds > 10 * 5  # the 10 ESC clips alone are 5 s each
    config = cache.config
    assert config == FeatureConfig()
    assert len(entries(cache)) == 30
    for path in table["path"]:
        stored = cache.load(path, mmap=False)
        wave = load_clip(path, config.sample_rate)
        assert stored.dtype == np.float16
        assert stored.shape == (config.n_mels, config.num_frames(len(wave)))
        # Batched in the cache, one at a time here: the same values to float16 precision.
        np.testing.assert_allclose(stored, log_mel(wave, config), atol=0.04)


def test_rerun_skips_everything(prepared):
    table, cache, _ = prepared
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.folder.glob("clips/*/*.npy")}
    again, report = prepare(table, cache.root, workers=0, progress=False)
    assert (report.total, report.skipped, report.done, report.failed) == (30, 30, 0, 0)
    assert again.folder == cache.folder
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in cache.folder.glob("clips/*/*.npy")}
    assert after == before


def test_load_is_memory_mapped_and_crops_read_the_same_values(prepared, esc_clips):
    _, cache, _ = prepared
    mapped = cache.load(esc_clips[0])
    assert isinstance(mapped, np.memmap)
    full = cache.load(esc_clips[0], mmap=False)
    assert not isinstance(full, np.memmap)
    crop = np.asarray(mapped[:, 100:228])
    assert crop.shape == (128, 128)
    np.testing.assert_array_equal(crop, full[:, 100:228])


def test_cache_reopens_from_its_folder(prepared, fsdd_clips):
    _, cache, _ = prepared
    reopened = FeatureCache(cache.root)  # the only config present
    assert reopened.config == cache.config and reopened.folder == cache.folder
    np.testing.assert_array_equal(reopened.load(fsdd_clips[0]), cache.load(fsdd_clips[0]))


def test_missing_entry_is_a_cache_error(tmp_path, prepared):
    _, cache, _ = prepared
    clip = tmp_path / "new.wav"
    clip.write_bytes(b"anything")
    assert clip not in cache
    with pytest.raises(CacheError, match=r"not in the cache .* \(run prepare\)"):
        cache.load(clip)
    with pytest.raises(CacheError, match="cannot read the source file"):
        cache.load(tmp_path / "absent.wav")
    assert tmp_path / "absent.wav" not in cache


def test_changed_config_uses_its_own_folder(tmp_path, fsdd_clips):
    clips = [str(p) for p in fsdd_clips[:5]]
    first, _ = prepare(clips, tmp_path, workers=0, progress=False)
    second, report = prepare(clips, tmp_path, SMALL, workers=0, progress=False)
    assert second.folder != first.folder
    assert (report.done, report.skipped) == (5, 0)  # nothing reused across configs
    assert second.load(clips[0]).shape[0] == 64 and first.load(clips[0]).shape[0] == 128
    assert FeatureCache(tmp_path, SMALL).config == SMALL
    with pytest.raises(CacheError, match="2 configs"):
        FeatureCache(tmp_path)
    with pytest.raises(CacheError, match="no prepared features"):
        FeatureCache(tmp_path / "empty")


def test_config_file_that_disagrees_is_refused(tmp_path, fsdd_clips):
    cache, _ = prepare([str(fsdd_clips[0])], tmp_path, SMALL, workers=0, progress=False)
    (cache.folder / "config.json").write_text(
        (cache.folder / "config.json").read_text().replace('"n_mels": 64', '"n_mels": 65')
    )
    with pytest.raises(CacheError, match="config.json: holds"):
        FeatureCache(tmp_path, SMALL)


def test_config_folder_of_other_features_is_refused_not_mixed(tmp_path, fsdd_clips):
    cache, _ = prepare([str(fsdd_clips[0])], tmp_path, SMALL, workers=0, progress=False)
    with pytest.raises(CacheError, match="different parameters.*n_mels 64 vs 128"):
        FeatureCache(cache.folder, FeatureConfig())
    assert FeatureCache(cache.folder).config == SMALL  # the folder names its own config


def test_edited_or_touched_source_is_recomputed(tmp_path, fsdd_clips, esc_clips):
    # Copies (never the shared originals): this test modifies them.
    clips = [Path(shutil.copy(p, tmp_path / p.name)) for p in (*fsdd_clips[:3], esc_clips[0])]
    cache, _ = prepare(clips, tmp_path / "cache", SMALL, workers=0, progress=False)
    assert all(c in cache for c in clips)

    touched, edited = clips[0], clips[3]
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    edited.write_bytes(esc_clips[1].read_bytes())  # new content, new features
    assert touched not in cache and edited not in cache
    with pytest.raises(CacheError, match="not in the cache"):
        cache.load(edited)

    cache, report = prepare(clips, tmp_path / "cache", SMALL, workers=0, progress=False)
    assert (report.done, report.skipped, report.failed) == (2, 2, 0)
    np.testing.assert_allclose(
        cache.load(edited), log_mel(load_clip(esc_clips[1], SMALL.sample_rate), SMALL), atol=0.04
    )


def test_shards_together_equal_one_run(tmp_path, fsdd_clips, esc_clips):
    clips = real_clips(fsdd_clips, esc_clips)
    whole, whole_report = prepare(clips, tmp_path / "whole", SMALL, workers=0, progress=False)
    done = []
    for index in range(3):
        sharded, report = prepare(
            clips, tmp_path / "sharded", SMALL, workers=0, shard=(index, 3), progress=False
        )
        done.append(report.done)
        assert (sharded.folder / f"failures-shard{index}of3.csv").is_file()
    assert sum(done) == whole_report.done == len(clips)
    assert max(done) - min(done) <= 1  # balanced
    assert entries(sharded) == entries(whole)
    with pytest.raises(ValueError, match="shard index"):
        prepare(clips, tmp_path / "x", SMALL, shard=(3, 3), progress=False)


def test_bad_clips_are_reported_and_the_rest_prepared(
    tmp_path, fsdd_clips, make_bad_clips, bad_clip_reasons
):
    root = tmp_path / "data"
    for clip in fsdd_clips[:8]:
        (root / clip.name[0]).mkdir(parents=True, exist_ok=True)
        (root / clip.name[0] / clip.name).symlink_to(clip)
    bad = make_bad_clips(root / "broken")
    table = load_dataset(root)
    cache, report = prepare(table, tmp_path / "cache", SMALL, workers=0, progress=False)

    good = [str(p.resolve()) for p in fsdd_clips[:8]] + [str(root / "broken" / "truncated_ok.wav")]
    assert all(p in cache for p in good)
    assert report.done == len(good)
    reasons = dict(report.failures)
    assert sorted(reasons) == sorted(str(p) for p in bad.values())
    for name, path in bad.items():
        assert bad_clip_reasons[name] in reasons[str(path)]
    with open(cache.folder / "failures.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["path"]: r["reason"] for r in rows} == reasons

    # Nothing is cached for a failure, so a rerun tries the bad ones again (and only them).
    _, again = prepare(table, tmp_path / "cache", SMALL, workers=0, progress=False)
    assert (again.skipped, again.done, again.failed) == (len(good), 0, len(bad))


def test_cli_prepare_with_failures_exits_1_and_counts_them(
    tmp_path, fsdd_clips, make_bad_clips, run_cli
):
    root = tmp_path / "data"
    for clip in fsdd_clips[:4]:
        (root / "speech").mkdir(parents=True, exist_ok=True)
        (root / "speech" / clip.name).symlink_to(clip)
    bad = make_bad_clips(root / "broken")
    code, out, err = run_cli(
        "prepare", root, "--out", tmp_path / "cache", "--workers", "0", "--n-mels", "64"
    )
    assert code == 1
    assert f"prepared 5 clips, skipped 0 already done, {len(bad)} failed" in out
    assert f"{len(bad)} clips failed; see " in err and "failures.csv" in err
    for path in bad.values():
        assert str(path) in err
    assert str(tmp_path / "cache" / SMALL.digest) in out


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path, fsdd_clips, monkeypatch):
    for host in ("vm", "node07.cluster.example.org"):  # hostnames may contain dots
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        cache, _ = prepare([str(fsdd_clips[0])], tmp_path / host, SMALL, workers=0, progress=False)
        entry = cache.entry(fsdd_clips[0])
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        stale = entry.with_name(f"{entry.stem}.{host}.{dead.pid}.tmp")
        alive = entry.with_name(f"{entry.stem}.{host}.{os.getpid()}.tmp")
        elsewhere = entry.with_name(f"{entry.stem}.otherhost.{dead.pid}.tmp")
        odd = entry.with_name(f"{entry.stem}.{host}.notapid.tmp")
        for tmp in (stale, alive, elsewhere, odd):
            tmp.write_bytes(b"partial")
        _, report = prepare([str(fsdd_clips[0])], tmp_path / host, SMALL, workers=0, progress=False)
        assert report.skipped == 1
        assert not stale.exists(), host
        assert alive.exists() and elsewhere.exists()  # a live writer's, another host's
        assert odd.exists()  # not named by a writer: left alone, and no crash


def test_in_process_run_keeps_the_callers_torch_threads(tmp_path, fsdd_clips):
    """prepare(workers=0), or with nothing left to do, runs in the caller's process; the
    caller (e.g. training right after) must keep its own thread count."""
    original = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        clips = [str(p) for p in fsdd_clips[:3]]
        _, report = prepare(clips, tmp_path, SMALL, workers=0, progress=False)
        assert report.done == 3 and torch.get_num_threads() == 3
        _, report = prepare(clips, tmp_path, SMALL, progress=False)  # all cached: no pool
        assert report.skipped == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(original)


def test_kill_9_leaves_only_whole_entries_and_a_rerun_finishes(tmp_path, fsdd_dir):
    """SIGKILL a multi-process ``soundsight prepare`` of all of FSDD mid-run."""
    out = tmp_path / "cache"
    config = FeatureConfig()
    clips = out / config.digest / "clips"
    program = shutil.which("soundsight") or pytest.fail("the soundsight command is not installed")
    command = [program, "prepare", str(fsdd_dir), "--split", "all"]
    process = subprocess.Popen(
        [*command, "--out", str(out), "--workers", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches the workers too
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            if len(list(clips.glob("*/*.npy"))) >= 50:
                break
            time.sleep(0.005)
        assert process.poll() is None, "prepare finished (or failed) before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # The orphaned workers die and are reaped a moment later; the rerun comes after that.
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the killed prepare's workers are still there"
        time.sleep(0.01)

    done = sorted(clips.glob("*/*.npy"))
    assert 50 <= len(done) < 3000
    for entry in done:
        features = np.load(entry)
        assert features.dtype == np.float16
        assert features.shape[0] == config.n_mels and features.shape[1] >= 5
        assert np.isfinite(features).all()

    table = load_dataset(fsdd_dir, split="all")
    cache, report = prepare(table, out, config, workers=2, progress=False)  # the pool
    assert report.failures == []
    assert report.total == 3000
    assert report.skipped == len(done)
    assert report.done == 3000 - len(done)
    assert len(list(clips.glob("*/*.npy"))) == 3000
    assert not list(clips.glob("*/*.tmp"))  # the killed writers' temporaries are cleared
    # Entries written by the killed run's workers are the features of their clips.
    killed_run = set(done)
    for path in [p for p in table["path"] if cache.entry(p) in killed_run][:10]:
        np.testing.assert_allclose(
            cache.load(path), log_mel(load_clip(path, config.sample_rate), config), atol=0.04
        )
