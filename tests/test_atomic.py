"""Atomic writes (``atomic.py``): readers see the old content or the new, whole; failures leave nothing behind."""

import pytest

from stepdistill.atomic import atomic_dir, atomic_file


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "cache" / "x.bin"
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_text("first")
        assert not path.exists()  # nothing visible until the block ends
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "first" and _leftovers(path.parent) == []
    with atomic_file(path) as tmp:
        tmp.write_text("second")
    assert path.read_text() == "second" and _leftovers(path.parent) == []


def test_folder_replace_swaps_and_a_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "pipeline"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("crash while exporting")
    assert [p.name for p in out.iterdir()] == ["a.txt"] and _leftovers(tmp_path) == []
    with atomic_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b.txt"] and _leftovers(tmp_path) == []


def test_folder_without_replace_keeps_the_first_published_copy(tmp_path):
    """Two writers of one cache entry (two ranks): each stages under its own name; the first to publish wins."""
    out = tmp_path / "teacher"
    with atomic_dir(out, replace=False) as first:
        (first / "w.txt").write_text("first")
        with atomic_dir(out, replace=False) as second:  # another process, interleaved
            assert second != first
            (second / "w.txt").write_text("second")
    assert (out / "w.txt").read_text() == "second"  # the inner writer published first
    with atomic_dir(out, replace=False) as late:
        (late / "w.txt").write_text("late")
    assert (out / "w.txt").read_text() == "second" and _leftovers(tmp_path) == []


def test_what_is_published_is_on_disk_before_its_name(tmp_path, monkeypatch):
    """Every file of a checkpoint, an atomic file and an atomic folder is fsynced before the rename that publishes
    it (a rename alone survives a crash of the process, not a power loss)."""
    import os

    import stepdistill.atomic
    from stepdistill.config import build_recipe
    from stepdistill.train import Trainer

    from ._recipes import gmm_recipe

    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(stepdistill.atomic.os, "fsync", spy)
    with atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("x")
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a.txt").write_text("a")
    assert any(p.endswith(".tmp") and ".f.txt." in p for p in synced)  # the staging file, before the rename
    assert any(p.endswith("a.txt") and ".d." in p for p in synced)
    Trainer(build_recipe(gmm_recipe(**{"train.max_steps": 3})), tmp_path / "run", show_progress=False).setup().train()
    ckpt = tmp_path / "run" / "checkpoints" / "step-3"
    staged = {os.path.basename(p) for p in synced if "/.step-3.tmp/" in p}
    assert staged == {f.name for f in ckpt.iterdir()}
