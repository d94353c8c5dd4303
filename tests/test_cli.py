"""The ``soundsight`` command: help, prepare and export-images end to end, exit codes."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from soundsight import FeatureCache, FeatureConfig

PREPARE_OPTIONS = (
    "--out",
    "--shard",
    "--workers",
    "--layout",
    "--split",
    "--label-regex",
    "--group-regex",
    "--csv",
    "--path-column",
    "--label-column",
    "--sample-rate",
    "--n-fft",
    "--hop-length",
    "--n-mels",
    "--fmin",
    "--fmax",
    "--top-db",
)
EXPORT_OPTIONS = ("--out", "--size", "--cmap", "--workers", "--layout", "--n-mels", "--top-db")


def test_installed_command_help():
    program = shutil.which("soundsight")
    assert program, "the soundsight console script is not installed"
    result = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: soundsight" in result.stdout
    assert "prepare" in result.stdout and "export-images" in result.stdout


@pytest.mark.parametrize(
    ("command", "options"), [("prepare", PREPARE_OPTIONS), ("export-images", EXPORT_OPTIONS)]
)
def test_subcommand_help_lists_its_options(run_cli, command, options):
    code, out, _ = run_cli(command, "--help")
    assert code == 0
    assert f"usage: soundsight {command}" in out
    for option in options:
        assert option in out, option
    assert "(default: 22050)" in out  # feature defaults are shown


def test_no_command_is_a_usage_error(run_cli):
    code, _, err = run_cli()
    assert code == 2 and "usage:" in err


def test_prepare_nonexistent_folder(tmp_path, run_cli):
    missing = tmp_path / "no such dataset"
    code, out, err = run_cli("prepare", missing, "--out", tmp_path / "cache")
    assert code == 2
    assert err.startswith("error:") and str(missing) in err
    assert not (tmp_path / "cache").exists()


def test_prepare_folder_of_unknown_layout(tmp_path, fsdd_clips, run_cli):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clip.wav").symlink_to(fsdd_clips[0])
    code, _, err = run_cli("prepare", tmp_path / "data", "--out", tmp_path / "cache")
    assert code == 2
    assert "error:" in err and "unknown layout" in err and "--layout" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--shard", "3/3"), "shard index"),
        (("--fmax", "30000"), "fmax"),
        (("--n-mels", "0"), "n_mels must be 1 to 1024"),
    ],
)
def test_prepare_bad_options(tmp_path, esc_subset, run_cli, args, message):
    code, _, err = run_cli(
        "prepare", esc_subset, "--out", tmp_path / "cache", "--workers", "0", *args
    )
    assert code == 2
    assert err.startswith("error:") and message in err


def test_prepare_esc_subset_then_rerun(tmp_path, esc_subset, esc_clips, run_cli):
    args = ("prepare", esc_subset, "--out", tmp_path / "cache", "--workers", "0")
    custom = ("--sample-rate", "16000", "--n-fft", "512", "--hop-length", "160", "--n-mels", "64")
    code, out, err = run_cli(*args, *custom, "--fmax", "7000")
    assert code == 0, err
    assert "prepared 10 clips, skipped 0 already done, 0 failed" in out
    config = FeatureConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=64, fmax=7000.0)
    assert f"cache: {tmp_path / 'cache' / config.digest}" in out
    cache = FeatureCache(tmp_path / "cache")
    assert cache.config == config
    features = cache.load(esc_clips[0])
    assert features.shape == (64, config.num_frames(5 * 16000)) and features.dtype == np.float16

    code, out, _ = run_cli(*args, *custom, "--fmax", "7000")
    assert code == 0
    assert "prepared 0 clips, skipped 10 already done, 0 failed" in out


def test_prepare_regex_layout_and_test_split(tmp_path, fsdd_clips, run_cli):
    data = tmp_path / "data"
    data.mkdir()
    for clip in fsdd_clips:
        (data / clip.name.replace("_", "-", 1)).symlink_to(clip)
    code, out, err = run_cli(
        "prepare",
        data,
        "--layout",
        "regex",
        "--label-regex",
        r"^(\d)-",
        "--out",
        tmp_path / "cache",
        "--workers",
        "0",
        "--n-mels",
        "32",
    )
    assert code == 0, err
    assert f"prepared {len(fsdd_clips)} clips" in out


def test_prepare_shards_on_the_command_line(tmp_path, esc_subset, run_cli):
    base = ("prepare", esc_subset, "--out", tmp_path / "cache", "--workers", "0", "--n-mels", "32")
    counts = []
    for index in range(2):
        code, out, _ = run_cli(*base, "--shard", f"{index}/2")
        assert code == 0
        counts.append(int(out.split("prepared ")[1].split()[0]))
    assert counts == [5, 5]
    code, out, _ = run_cli(*base)
    assert "prepared 0 clips, skipped 10 already done" in out


def test_export_images_nonexistent_folder(tmp_path, run_cli):
    code, _, err = run_cli("export-images", tmp_path / "absent", "--out", tmp_path / "img")
    assert code == 2 and "error:" in err and str(tmp_path / "absent") in err


def test_export_images_with_failures_exits_1(tmp_path, fsdd_clips, make_bad_clips, run_cli):
    data = tmp_path / "data"
    (data / "speech").mkdir(parents=True)
    (data / "speech" / fsdd_clips[0].name).symlink_to(fsdd_clips[0])
    bad = make_bad_clips(data / "broken")
    code, out, err = run_cli(
        "export-images", data, "--out", tmp_path / "img", "--size", "32", "--workers", "0"
    )
    assert code == 1
    assert f"exported 2 clips, skipped 0 already done, {len(bad)} failed" in out
    assert f"{len(bad)} clips failed" in err and "failures.csv" in err
