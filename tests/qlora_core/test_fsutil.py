"""qlora_core/fsutil.py: a finished temp dir takes its final place, replacing an older copy."""

from __future__ import annotations

from pathlib import Path

from qlora_core.fsutil import replace_dir


def _dir(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "file").write_text(text)
    return path


def test_a_new_dir_is_renamed_into_place(tmp_path: Path) -> None:
    replace_dir(_dir(tmp_path / ".tmp-a", "new"), tmp_path / "a", tmp_path / ".old-a")
    assert (tmp_path / "a" / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_an_existing_dir_is_replaced_and_its_old_copy_removed(tmp_path: Path) -> None:
    _dir(tmp_path / "a", "old")
    (tmp_path / "a" / "stale").write_text("only in the old copy")
    replace_dir(_dir(tmp_path / ".tmp-a", "new"), tmp_path / "a", tmp_path / ".old-a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["file"]
    assert (tmp_path / "a" / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
