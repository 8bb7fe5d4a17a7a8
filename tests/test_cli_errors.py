"""Every case of the shared table (tests/cli_cases.py): one line on stderr, exit status 2, nothing written."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_cases import CASES, Case

ROOT = Path(__file__).resolve().parents[1]
PROGS = {"train": "pararnn-train", "convert": "pararnn-convert", "demo": "pararnn-demo"}


def _main(tool):
    if tool == "train":
        from pararnn_torch.train import main
    elif tool == "convert":
        from pararnn_convert.cli import main
    else:
        from pararnn_convert.demo import main
    return main


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")


def _assert_untouched(folder):
    assert [p.name for p in folder.iterdir()] == ["theirs.txt"]


def _inject(case: Case, tmp_path, monkeypatch, request):
    if case.fault == "enospc":
        if case.tool == "train":
            monkeypatch.setattr("pararnn_torch.lm._save_shard", _full_disk)
        elif "to-mlx" in case.argv:
            monkeypatch.setattr("mlx.core.save_safetensors", _full_disk)
        else:
            monkeypatch.setattr("safetensors.torch.save_file", _full_disk)
    elif case.fault == "race":
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_while_someone_creates_out(tensors, path, metadata=None):
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "theirs.txt").write_text("keep")
            real_save(tensors, path, metadata=metadata)

        monkeypatch.setattr("safetensors.torch.save_file", save_while_someone_creates_out)
        request.addfinalizer(lambda: _assert_untouched(tmp_path / "out"))
    elif case.fault == "locked":
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nfrom pararnn_core.safe_folder import FolderLock\n"
             "FolderLock(sys.argv[1], 'lock-holder').__enter__()\nprint('ready', flush=True)\ntime.sleep(60)",
             str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )
        request.addfinalizer(lambda: (holder.kill(), holder.wait()))
        assert holder.stdout.readline().strip() == "ready"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_and_faults_give_one_line_and_status_2(case, tmp_path, monkeypatch, capsys, request):
    if "mlx" in case.backends:
        pytest.importorskip("mlx.core")
    if case.setup:
        case.setup(tmp_path)
    _inject(case, tmp_path, monkeypatch, request)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = _main(case.tool)(argv)
    except SystemExit as e:  # argparse errors exit from inside parse_args
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(PROGS[case.tool]) and ": error: " in lines[0], err
    assert case.expect in lines[0], err
    if case.no_output:
        assert not (tmp_path / "out").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging folders or lock files left


def test_the_installed_entry_point_exits_2_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pararnn_convert.cli", "from-apple", "--checkpoint", str(tmp_path / "a.pt"),
         "--out", str(tmp_path / "out"), "--num-heads", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pararnn-convert from-apple: error: argument --num-heads: expected an integer >= 1, got '0' "
        "(see pararnn-convert from-apple --help)"
    ]
