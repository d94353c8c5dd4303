"""Dataset layouts: the real ESC-50 and FSDD folders, generated FSDKaggle2018, folder,
regex and csv trees (symlinks to real clips), and the errors for what cannot be read."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from soundsight import LAYOUTS, DatasetError, detect_layout, load_dataset, prepare
from soundsight.layouts import COLUMNS

FSDD_SPEAKERS = {"george", "jackson", "lucas", "nicolas", "theo", "yweweler"}


def link(target: Path, link_path: Path) -> Path:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target)
    return link_path


def test_real_esc50(esc50_dir):
    assert detect_layout(esc50_dir) == "esc50"
    table = load_dataset(esc50_dir)
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    assert list(table.columns) == list(COLUMNS)
    assert table.attrs["layout"] == "esc50"
    assert len(table) == 414
    assert table["label"].nunique() == 50
    assert table["fold"].notna().all() and table["group"].notna().all()
    assert table["fold"].value_counts().to_dict() == {4: 400, 2: 11, 5: 2, 3: 1}
    assert table["group"].nunique() == 309  # src_file
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in table["path"])
    # Each row keeps its own file's label, fold and source recording.
    row = table.set_index(table["path"].map(lambda p: Path(p).name)).loc[meta["filename"][0]]
    assert row["label"] == meta["category"][0]
    assert row["fold"] == meta["fold"][0]
    assert row["group"] == str(meta["src_file"][0])


def test_real_fsdd(fsdd_dir):
    assert detect_layout(fsdd_dir) == "fsdd"
    assert detect_layout(fsdd_dir / "recordings") == "fsdd"
    train = load_dataset(fsdd_dir)
    test = load_dataset(fsdd_dir, split="test")
    everything = load_dataset(fsdd_dir, split="all")
    assert (len(train), len(test), len(everything)) == (2700, 300, 3000)
    assert not set(train["path"]) & set(test["path"])
    assert sorted(train["label"].unique()) == [str(d) for d in range(10)]
    assert set(train["group"]) == set(test["group"]) == FSDD_SPEAKERS
    for table in (train, test):
        names = table["path"].map(lambda p: Path(p).stem.split("_"))
        assert (names.str[0] == table["label"]).all()
        assert (names.str[1] == table["group"]).all()
    assert (test["path"].map(lambda p: int(Path(p).stem.split("_")[2])) < 5).all()
    with pytest.raises(DatasetError, match="split"):
        load_dataset(fsdd_dir, split="validation")


def test_esc50_subset_fixture(esc_subset, esc_meta):
    table = load_dataset(esc_subset)
    assert table.attrs["layout"] == "esc50"
    assert list(table["label"]) == list(esc_meta["category"])


@pytest.fixture
def fsdkaggle_root(tmp_path, esc_clips, fsdd_clips):
    """FSDKaggle2018 tree: train.csv + audio_train/, audio_test/ + labelled test CSV."""
    root = tmp_path / "FSDKaggle2018"
    train = pd.DataFrame(
        {
            "fname": [f"{i:08x}.wav" for i in range(6)],
            "label": ["Bark", "Bass_drum", "Bark", "Cello", "Cello", "Bass_drum"],
            "manually_verified": ["1", "0", "0", "1", "1", "0"],
        }
    )
    for fname, source in zip(train["fname"], fsdd_clips, strict=False):
        link(source, root / "audio_train" / fname)
    train.to_csv(root / "train.csv", index=False)
    test = pd.DataFrame(
        {
            "fname": ["t1.wav", "t2.wav", "t3.wav"],
            "label": ["Bark", "Cello", "None"],
            "usage": ["Public", "Private", "Ignored"],
            "freesound_id": ["1", "2", "3"],
            "license": ["CC0"] * 3,
        }
    )
    for fname, source in zip(test["fname"], esc_clips, strict=False):
        link(source, root / "audio_test" / fname)
    test.to_csv(root / "test_post_competition.csv", index=False)
    return root


def test_fsdkaggle2018_train_and_labelled_test(fsdkaggle_root, fsdd_clips, esc_clips):
    assert detect_layout(fsdkaggle_root) == "fsdkaggle2018"
    train = load_dataset(fsdkaggle_root)
    assert train.attrs["layout"] == "fsdkaggle2018"
    assert list(train["label"]) == ["Bark", "Bass_drum", "Bark", "Cello", "Cello", "Bass_drum"]
    assert list(train["verified"]) == [True, False, False, True, True, False]
    assert list(train["path"]) == [str(p.resolve()) for p in fsdd_clips[:6]]
    test = load_dataset(fsdkaggle_root, split="test")
    # Rows the competition ignored (usage == Ignored) are not evaluation clips.
    assert list(test["label"]) == ["Bark", "Cello"]
    assert list(test["path"]) == [str(p.resolve()) for p in esc_clips[:2]]
    assert test["verified"].isna().all()


def test_fsdkaggle2018_unlabelled_test_side(fsdkaggle_root):
    (fsdkaggle_root / "test_post_competition.csv").unlink()
    pd.DataFrame({"fname": ["t1.wav", "t2.wav", "t3.wav"], "label": ["Bark a b c"] * 3}).to_csv(
        fsdkaggle_root / "sample_submission.csv", index=False
    )
    test = load_dataset(fsdkaggle_root, split="test")
    assert len(test) == 3
    assert test["label"].isna().all()  # a sample submission's labels are not truth
    assert all(Path(p).is_file() for p in test["path"])


def test_fsdkaggle2018_missing_column(fsdkaggle_root):
    pd.DataFrame({"file": ["a.wav"], "label": ["Bark"]}).to_csv(
        fsdkaggle_root / "train.csv", index=False
    )
    with pytest.raises(DatasetError, match=r"train\.csv: missing column\(s\) fname"):
        load_dataset(fsdkaggle_root)


def test_folder_per_class(fsdd_subset, fsdd_clips):
    assert detect_layout(fsdd_subset) == "folder"
    table = load_dataset(fsdd_subset)
    assert table.attrs["layout"] == "folder"
    assert len(table) == len(fsdd_clips)
    assert sorted(table["path"]) == sorted(str(p.resolve()) for p in fsdd_clips)
    by_path = dict(zip(table["path"], table["label"], strict=True))
    for clip in fsdd_clips:
        assert by_path[str(clip.resolve())] == clip.name.split("_")[0]


def test_folder_layout_reads_nested_folders_and_all_audio_extensions(
    tmp_path, fsdd_clips, esc_clips
):
    link(fsdd_clips[0], tmp_path / "speech" / "take1" / "a.wav")
    link(fsdd_clips[1], tmp_path / "speech" / "b.WAV")
    link(esc_clips[0], tmp_path / "noise" / "c.flac")
    (tmp_path / "noise" / "notes.txt").write_text("not audio")
    table = load_dataset(tmp_path)
    assert sorted(table["label"]) == ["noise", "speech", "speech"]


def test_regex_layout(tmp_path, fsdd_clips):
    for i, clip in enumerate(fsdd_clips[:6]):
        link(clip, tmp_path / f"{['dog', 'cat'][i % 2]}-{i:03d}.wav")
    link(fsdd_clips[6], tmp_path / "README.wav")
    with pytest.raises(DatasetError, match="unknown layout"):
        load_dataset(tmp_path)
    with pytest.warns(UserWarning, match=r"1 files do not match .* README\.wav"):
        table = load_dataset(tmp_path, "regex", label_regex=r"^([a-z]+)-", group_regex=r"-(\d)")
    assert table.attrs["layout"] == "regex"
    assert sorted(table["label"]) == ["cat"] * 3 + ["dog"] * 3
    assert set(table["group"]) == {"0"}
    with pytest.raises(DatasetError, match="needs --label-regex"):
        load_dataset(tmp_path, "regex")
    with (
        pytest.raises(DatasetError, match="no audio file name matches"),
        pytest.warns(UserWarning, match="7 files do not match"),
    ):
        load_dataset(tmp_path, "regex", label_regex=r"^zebra")


def test_csv_layout_with_named_columns(tmp_path, fsdd_clips, esc_clips):
    link(fsdd_clips[0], tmp_path / "clips" / "one.wav")
    link(esc_clips[0], tmp_path / "clips" / "two.flac")
    pd.DataFrame(
        {
            "file": ["clips/one.wav", "clips/two.flac", str(fsdd_clips[2])],  # relative, absolute
            "class": ["speech", "cow", "speech"],
            "fold": ["1", "2", "2"],
            "group": ["g1", "g2", "g1"],
            "extra": ["x", "y", "z"],
        }
    ).to_csv(tmp_path / "labels.csv", index=False)
    table = load_dataset(
        tmp_path, "csv", csv="labels.csv", path_column="file", label_column="class"
    )
    assert list(table["label"]) == ["speech", "cow", "speech"]
    assert list(table["fold"]) == [1, 2, 2]
    assert list(table["group"]) == ["g1", "g2", "g1"]
    assert list(table["path"]) == [
        str(p.resolve()) for p in (fsdd_clips[0], esc_clips[0], fsdd_clips[2])
    ]
    with pytest.raises(DatasetError, match="no label column 'label'"):
        load_dataset(tmp_path, "csv", csv="labels.csv", path_column="file")
    with pytest.raises(DatasetError, match=r"missing column\(s\) path"):
        load_dataset(tmp_path, "csv", csv="labels.csv")
    with pytest.raises(DatasetError, match="needs --csv"):
        load_dataset(tmp_path, "csv")
    with pytest.raises(DatasetError, match="cannot read CSV"):
        load_dataset(tmp_path, "csv", csv="nope.csv")
    unlabelled = load_dataset(
        tmp_path, "csv", csv="labels.csv", path_column="file", label_column=None
    )
    assert unlabelled["label"].isna().all()


LABELS = ["Bass drum", "café ☕", " Trailing space "]


def test_labels_with_spaces_and_unicode(tmp_path, fsdd_clips):
    folders = tmp_path / "folders"
    for label, clip in zip(LABELS, fsdd_clips, strict=False):
        link(clip, folders / label / clip.name)
    table = load_dataset(folders)
    # Labels are stripped of surrounding whitespace; inner spaces and unicode survive.
    assert sorted(table["label"]) == ["Bass drum", "Trailing space", "café ☕"]

    pd.DataFrame({"path": [str(p) for p in fsdd_clips[:3]], "label": LABELS}).to_csv(
        tmp_path / "labels.csv", index=False, encoding="utf-8"
    )
    table = load_dataset(tmp_path, "csv", csv="labels.csv")
    assert list(table["label"]) == ["Bass drum", "café ☕", "Trailing space"]


def test_duplicate_rows_are_dropped_with_a_warning(tmp_path, fsdd_clips):
    rows = [str(fsdd_clips[0]), str(fsdd_clips[1]), str(fsdd_clips[0]), str(fsdd_clips[2])]
    pd.DataFrame({"path": rows, "label": ["a", "b", "a", "c"]}).to_csv(
        tmp_path / "dups.csv", index=False
    )
    with pytest.warns(UserWarning, match=r"1 duplicate rows dropped") as record:
        table = load_dataset(tmp_path, "csv", csv="dups.csv")
    assert "different labels" not in str(record[0].message)
    assert list(table["label"]) == ["a", "b", "c"]
    assert table["path"].is_unique

    # The same file listed under two labels: the warning says so, the first row wins.
    pd.DataFrame({"path": rows[:3], "label": ["a", "b", "z"]}).to_csv(
        tmp_path / "conflict.csv", index=False
    )
    with pytest.warns(UserWarning, match=r"different labels for .*" + fsdd_clips[0].name):
        table = load_dataset(tmp_path, "csv", csv="conflict.csv")
    assert list(table["label"]) == ["a", "b"]


def test_empty_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"no audio files \(\.wav, \.flac") as info:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="no audio files"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no audio files in class sub-folders"):
        load_dataset(tmp_path, "folder")


def test_unknown_layout(tmp_path, fsdd_clips):
    link(fsdd_clips[0], tmp_path / "recording one.wav")
    with pytest.raises(DatasetError) as info:
        detect_layout(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "unknown layout" in message
    for looked_for in ("train.csv", "meta/esc50.csv", "recordings/", "sub-folders", "--layout"):
        assert looked_for in message
    with pytest.raises(DatasetError, match=r"unknown layout 'nope'; choose from .*fsdd"):
        load_dataset(tmp_path, "nope")


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found") as info:
        load_dataset(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value)
    with pytest.raises(DatasetError, match="not a folder"):
        detect_layout(tmp_path / "absent")


def test_every_layout_is_registered():
    assert set(LAYOUTS) == {
        "fsdkaggle2018",
        "fsdkaggle2019",
        "fsd50k",
        "esc50",
        "fsdd",
        "folder",
        "regex",
        "csv",
    }


def test_csv_row_whose_file_is_missing_fails_in_prepare_only(tmp_path, fsdd_clips):
    present = [str(p) for p in fsdd_clips[:4]]
    missing = str(tmp_path / "gone" / "lost.wav")
    pd.DataFrame({"path": [*present, missing], "label": list("abcde")}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    table = load_dataset(tmp_path, "csv", csv="labels.csv")
    assert len(table) == 5  # listing a clip does not read it
    cache, report = prepare(table, tmp_path / "cache", workers=0, progress=False)
    assert report.failures == [(missing, "file not found")]
    assert report.done == 4
    assert all(p in cache for p in present)
