"""Files that are whole or absent (mim.files): what every writer of results and indexes uses."""

from __future__ import annotations

import pytest

from mim.files import atomic_path, atomic_write_text


def test_a_file_appears_whole_under_its_name_only_at_the_end(tmp_path):
    path = tmp_path / "metrics.json"
    with atomic_path(path) as temporary:
        temporary.write_text("half")
        assert not path.exists() and temporary.parent == path.parent
    assert path.read_text() == "half" and not temporary.exists()
    atomic_write_text(path, "whole")
    assert path.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "_info.json"
    path.write_text("good")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(path) as temporary:
        temporary.write_text("par")
        raise RuntimeError("disk full")
    assert path.read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["_info.json"]
