"""The checkpoint save protocol: killed at every point it leaves one whole version; locked; no races."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pararnn_core import atomic_fs, checkpoint, safe_folder
from tests.fault_injection import write_version

ROOT = Path(__file__).resolve().parents[1]
#: points reached when a folder is replaced, with the version ``out`` must hold after a kill there
REPLACE_POINTS = {
    "exchange": {"staging-created": 1, "staging-partial": 1, "staging-written": 1, "staging-synced": 1,
                 "swapped": 2, "cleaned": 2},
    "renames": {"staging-created": 1, "staging-partial": 1, "staging-written": 1, "staging-synced": 1,
                "marked-complete": 1, "old-moved-aside": 2, "new-in-place": 2, "cleaned": 2},
}


def run_plan(tmp_path, plan, timeout=120):
    """Run tests/fault_injection.py on ``plan``; returns whether each item was killed by the hook."""
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fault_injection", str(tmp_path / "plan.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["index"] for line in lines] == list(range(len(plan))), proc.stdout + proc.stderr[-2000:]
    return [line["killed"] for line in lines], proc.stderr


def whole_version(out: Path) -> int:
    """The version a folder holds, after checking that all its files belong to that one version."""
    version = json.loads((out / "config.json").read_text())["version"]
    assert (load_file(str(out / checkpoint.WEIGHTS_FILE))["w"] == version).all()
    assert (out / "note.txt").read_text() == f"v{version}"
    return version


def test_fault_points_are_the_documented_ones():
    reached = set().union(*REPLACE_POINTS.values()) | {"placed"}
    assert reached == set(safe_folder.FAULT_POINTS)


def test_killed_at_every_point_of_the_save_the_folder_holds_one_whole_version(tmp_path):
    plan, expected = [], []
    for protocol, points in REPLACE_POINTS.items():
        for point, version in points.items():
            out = tmp_path / f"{protocol}-{point}"
            write_version(out, 1)
            plan.append({"entry": "write", "argv": [str(out), 2], "fault": point,
                         "no_exchange": protocol == "renames"})
            expected.append((out, protocol, point, version))
    plan.append({"entry": "write", "argv": [str(tmp_path / "first"), 2], "fault": "placed"})
    expected.append((tmp_path / "first", "exchange", "placed", 2))
    killed, stderr = run_plan(tmp_path, plan)
    assert all(killed), (killed, stderr)
    for out, protocol, point, version in expected:
        if (protocol, point) == ("renames", "old-moved-aside"):
            # the one instant without a folder when the file system cannot exchange: recoverable
            assert not out.exists() and safe_folder.missing_hint(out)
        else:
            assert whole_version(out) == version, (protocol, point)
        with safe_folder.FolderLock(out):  # the next writer recovers and cleans up
            pass
        assert whole_version(out) == version, (protocol, point)
        assert safe_folder.leftovers(out) == [], (protocol, point)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_exchange_and_noreplace_on_this_file_system(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    try:
        atomic_fs.exchange(a, b)
    except atomic_fs.NotSupported:
        pytest.skip("this file system cannot exchange folders (the rename fallback is tested above)")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with pytest.raises(FileExistsError):
        atomic_fs.rename_noreplace(a, b)


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "ck"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pararnn_core.safe_folder import FolderLock\n"
         "FolderLock(sys.argv[1], 'holder-tool').__enter__()\nprint('ready', flush=True)\ntime.sleep(60)", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(safe_folder.FolderBusy, match=rf"in use by holder-tool \(pid {holder.pid} on host "):
            write_version(out, 1)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    write_version(out, 1)  # the kernel released the lock of the killed holder
    assert whole_version(out) == 1
    assert not safe_folder.lock_path(out).exists()


def test_a_folder_created_while_writing_is_not_replaced_without_force(tmp_path):
    out = tmp_path / "ck"

    def writer_racing_someone(tensors, path, metadata):
        out.mkdir()
        (out / "theirs.txt").write_text("keep me")
        np.save(path, np.zeros(1))

    with pytest.raises(FileExistsError, match="created by someone else"):
        checkpoint.write_checkpoint(out, {}, {"w": np.zeros(1)}, writer_racing_someone, lambda a: a.nbytes,
                                    lambda a: "F64")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert safe_folder.leftovers(out) == []


def test_disk_full_while_writing_keeps_the_old_version_and_leaves_nothing(tmp_path):
    out = tmp_path / "ck"
    write_version(out, 1)

    def full_disk(tensors, path, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    with pytest.raises(OSError) as err:
        checkpoint.write_checkpoint(out, {"version": 2}, {"w": np.zeros(1)}, full_disk, lambda a: a.nbytes,
                                    lambda a: "F64", force=True)
    assert safe_folder.is_disk_full(err.value)
    assert whole_version(out) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_an_output_overlapping_an_input_is_refused(tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for out in (data, data / "run", tmp_path):
        with pytest.raises(ValueError, match="overlaps --data"):
            checkpoint.check_separate(out, {"--data": data})
    checkpoint.check_separate(tmp_path / "run", {"--data": data, "--tokenizer": None})
