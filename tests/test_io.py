"""Atomic writes: a destination holds the old file or the whole new one, never a torn write or a leftover."""

import pytest
import torch

from convsim_shrink.io import atomic_path, atomic_torch_save, atomic_write_bytes, atomic_write_text


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_write_creates_folders_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "a" / "b" / "f.json"
    atomic_write_bytes(path, b"old")
    atomic_write_text(path, "new é")
    assert path.read_text(encoding="utf-8") == "new é"
    assert _leftovers(path.parent) == []


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="writer crashed"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert path.read_bytes() == b"good"
    assert _leftovers(tmp_path) == []


def test_writer_given_a_name_writes_through_the_temporary(tmp_path):
    path = tmp_path / "plot.png"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".plot.png.") and tmp != path
        assert not path.exists()  # nothing visible until the block succeeds
        tmp.write_bytes(b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG" and _leftovers(tmp_path) == []


def test_torch_save_round_trips_without_unpickling_code(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "epoch": 3}
    path = atomic_torch_save(state, tmp_path / "ckpt.pt")
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])


def test_written_files_get_the_permissions_of_any_file_the_user_creates(tmp_path):
    # mkstemp's temporary is 0600; a report or model the user shares must not stay owner-only
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "report.md", "x")
    with atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"x")
    for name in ("report.md", "model.onnx"):
        assert (tmp_path / name).stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
