"""icpo._io: the one atomic write. The file lands whole or not at all, its data is fsynced before
the rename and the folder after it, and it gets a plain file's mode (umask), not mkstemp's 0600."""

import os
import stat

import pytest

from icpo import _io
from icpo.config import Config, save_config
from icpo.tasks.arithmetic import make_records, write_jsonl


@pytest.fixture
def umask():
    def set_to(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_to
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_new_files_get_the_umask_mode(tmp_path, umask, mask):
    umask(mask)
    text, data = tmp_path / "a" / "t.txt", tmp_path / "b.bin"
    _io.atomic_write_text(text, "héllo\n")
    _io.atomic_write_bytes(data, b"\x00\x01")
    assert text.read_text(encoding="utf-8") == "héllo\n" and data.read_bytes() == b"\x00\x01"
    assert _mode(text) == _mode(data) == 0o666 & ~mask


def test_config_and_data_files_are_readable_by_the_group(tmp_path, umask):
    """Issue 22: config.yaml and the generated data came out 0600 (tempfile.mkstemp)."""
    umask(0o022)
    save_config(Config(), tmp_path / "config.yaml")
    write_jsonl(make_records("train", 3), tmp_path / "train.jsonl")
    assert _mode(tmp_path / "config.yaml") == _mode(tmp_path / "train.jsonl") == 0o644


def test_replaces_whole_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "f.json"
    out.write_text("old")
    _io.atomic_write_text(out, "new")
    assert out.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    out = tmp_path / "plot.png"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with _io.atomic_path(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".plot.png.")
            assert tmp.name.endswith(".tmp")
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["plot.png"]


def test_fsync_policy_file_then_rename_then_folder(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with _io.atomic_path(tmp_path / "x.pt") as tmp:
        with open(tmp, "wb") as f:  # a writer that wants a path (torch.save, savefig)
            f.write(b"data")
    assert events == ["fsync file", "replace", "fsync dir"]
    assert (tmp_path / "x.pt").read_bytes() == b"data"


def test_two_writers_never_share_a_temporary_file(tmp_path):
    with _io.atomic_path(tmp_path / "f") as a, _io.atomic_path(tmp_path / "f") as b:
        assert a != b and a.exists() and b.exists()
        a.write_text("a")
        b.write_text("b")
    assert (tmp_path / "f").read_text() == "a"  # the outer block ends last
    assert os.listdir(tmp_path) == ["f"]
