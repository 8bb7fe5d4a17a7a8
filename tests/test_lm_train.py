"""pararnn-train: exact resume after an interruption, DDP over 2 gloo processes equals one process, bad input."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pararnn_torch.train import run

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--eval-every", "3", "--eval-batches", "1", "--no-progress", "--device", "cpu", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    docs = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3 for i in range(40)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, corpus):
    common = ["--data", str(corpus), "--steps", "6", "--save-every", "2", *TINY]
    run(["--out", str(tmp_path / "straight"), *common])
    run(["--out", str(tmp_path / "cut"), *common, "--stop-after", "3"])
    state = torch.load(tmp_path / "cut" / "training_state.pt", weights_only=False)
    assert state["step"] == 3
    run(["--out", str(tmp_path / "cut"), *common, "--resume"])
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (tmp_path / "straight" / "loss_curve.png").stat().st_size > 1000
    metrics = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert sum('"train_loss"' in m for m in metrics) == 6


def test_ddp_two_gloo_processes_match_one_process(tmp_path, corpus):
    common = ["--data", str(corpus), "--steps", "3", "--save-every", "3", *TINY]
    single = run(["--out", str(tmp_path / "one"), *common])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free rendezvous port (a fixed one can collide with a run still tearing down);
    # a new session, so a hung run is killed with all its workers instead of leaving orphans
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "pararnn_torch.train", "--out", str(tmp_path / "two"), *common],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
    )
    try:
        stdout, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail("2-process DDP run did not finish in 240 s")
    proc = subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        key = "train_loss" if "train_loss" in a else "eval_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)
    assert single["train_loss"] == pytest.approx(two[2]["train_loss"], rel=1e-5)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_bad_input_gives_clear_errors_and_writes_nothing(tmp_path, corpus):
    with pytest.raises(SystemExit, match="unknown cell 'nope'"):
        run(["--out", str(tmp_path / "a"), "--data", str(corpus), "--cell", "nope", *TINY])
    with pytest.raises(SystemExit, match="does not exist"):
        run(["--out", str(tmp_path / "b"), "--data", str(tmp_path / "missing.txt"), *TINY])
    with pytest.raises(SystemExit, match="--resume, but"):
        run(["--out", str(tmp_path / "c"), "--data", str(corpus), "--resume", *TINY])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(SystemExit, match="bad.jsonl:2 is not valid JSON"):
        run(["--out", str(tmp_path / "d"), "--data", str(tmp_path / "bad.jsonl"), *TINY])
    with pytest.raises(SystemExit, match="not divisible by num_heads"):
        run(["--out", str(tmp_path / "e"), "--data", str(corpus), *TINY, "--heads", "3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit, match="already exists"):
        run(["--out", str(tmp_path / "taken"), "--data", str(corpus), *TINY])
