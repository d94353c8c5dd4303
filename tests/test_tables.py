"""CSV files read back as written: labels stay strings, formulas stay inert."""

from __future__ import annotations

import pandas as pd
import pytest

from soundsight.tables import neutralise, read_csv, restore, write_csv

AWKWARD = ["NA", "null", "None", "0", "01", "1.0", "=HYPERLINK(1)", "+1", "-x", "@a", "'q", ""]


def test_labels_round_trip_exactly_as_strings(tmp_path):
    frame = pd.DataFrame({"label": AWKWARD, "p": [0.5] * len(AWKWARD)})
    back = read_csv(write_csv(frame, tmp_path / "t.csv"), text=("label",))
    assert back["label"].tolist() == AWKWARD
    assert back["p"].dtype.kind == "f" and back["p"].tolist() == [0.5] * len(AWKWARD)


def test_cells_a_spreadsheet_would_run_are_written_quoted(tmp_path):
    frame = pd.DataFrame({"label": ["=1+1", "@SUM(A1)", "dog", "-2"], "p": [-0.5, 1, 2, 3]})
    lines = write_csv(frame, tmp_path / "t.csv").read_text().splitlines()
    assert lines[1:] == ["'=1+1,-0.5", "'@SUM(A1),1.0", "dog,2.0", "'-2,3.0"]


def test_header_and_index_labels_round_trip(tmp_path):
    labels = ["NA", "=cmd", "7"]
    frame = pd.DataFrame([[1, 0, 0], [0, 1, 0], [0, 0, 1]], index=labels, columns=labels)
    path = write_csv(frame, tmp_path / "confusion.csv", index=True)
    assert "'=cmd" in path.read_text()
    back = read_csv(path, index_col=0)
    assert back.index.tolist() == labels and back.columns.tolist() == labels
    assert back.to_numpy().tolist() == frame.to_numpy().tolist()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_csv(pd.DataFrame({"a": ["old"]}), tmp_path / "t.csv")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    with pytest.raises(OSError):
        write_csv(pd.DataFrame({"a": ["new"]}), path)
    monkeypatch.undo()
    assert read_csv(path)["a"].tolist() == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]


@pytest.mark.parametrize("text", AWKWARD)
def test_restore_undoes_neutralise(text):
    assert restore(neutralise(text)) == text
