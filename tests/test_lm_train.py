"""pararnn-train: exact resume after an interruption (no pickle), resume flag checks, DDP over 2 gloo processes
equals one process, bad input."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pararnn_core.checkpoint import CheckpointError
from pararnn_core.cli_args import CLIError
from pararnn_core.lm_config import ConfigError
from pararnn_torch import checkpointing
from pararnn_torch.data import DataError
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
    assert checkpointing.load_run(tmp_path / "cut").step == 3
    assert not list((tmp_path / "cut").glob("*.pt"))
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
    with pytest.raises(ConfigError, match="unknown cell 'nope'"):
        run(["--out", str(tmp_path / "a"), "--data", str(corpus), "--cell", "nope", *TINY])
    with pytest.raises(DataError, match="does not exist"):
        run(["--out", str(tmp_path / "b"), "--data", str(tmp_path / "missing.txt"), *TINY])
    with pytest.raises(CLIError, match="--resume, but"):
        run(["--out", str(tmp_path / "c"), "--data", str(corpus), "--resume", *TINY])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not valid JSON"):
        run(["--out", str(tmp_path / "d"), "--data", str(tmp_path / "bad.jsonl"), *TINY])
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        run(["--out", str(tmp_path / "e"), "--data", str(corpus), *TINY, "--heads", "3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no folders, no lock files
    (tmp_path / "taken").mkdir()
    with pytest.raises(CLIError, match="already exists"):
        run(["--out", str(tmp_path / "taken"), "--data", str(corpus), *TINY])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, corpus):
    """A 4-step run (saved at 2 and 4) and the flags that made it."""
    out = tmp_path_factory.mktemp("runs") / "short"
    flags = ["--data", str(corpus), "--steps", "4", "--save-every", "2", *TINY]
    run(["--out", str(out), *flags])
    return out, flags


def copy_run(run_folder, to):
    import shutil

    shutil.copytree(run_folder, to)
    return to


def test_resume_refuses_changed_model_and_data_flags_and_fewer_steps(tmp_path, short_run):
    out = copy_run(short_run[0], tmp_path / "run")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(CLIError) as err:
        run(["--out", str(out), "--resume", "--d-model", "64", "--layers", "2", "--cell", "lstm", "--seq-len", "16"])
    message = str(err.value)
    for difference in ("--d-model 64 (the run has 32)", "--layers 2 (the run has 1)", "--cell lstm (the run has gru)",
                       "--seq-len 16 (the run has 32)"):
        assert difference in message
    with pytest.raises(CLIError, match="--steps 3 is below the step 4"):
        run(["--out", str(out), "--resume", "--steps", "3"])
    with pytest.raises(CLIError, match="pass one of them"):
        run(["--out", str(out), "--resume", "--force"])
    assert (out / "model.safetensors").read_bytes() == before
    assert checkpointing.load_run(out).args["d_model"] == 32


def test_resume_inherits_the_run_flags_and_applies_a_changed_schedule(tmp_path, short_run, capsys):
    out = copy_run(short_run[0], tmp_path / "run")
    result = run(["--out", str(out), "--resume", "--steps", "6", "--lr", "5e-3"])  # nothing else given
    assert result["step"] == 6
    assert "--lr 0.01 -> 0.005" in capsys.readouterr().err
    state = checkpointing.load_run(out)
    assert state.args["d_model"] == 32 and state.args["lr"] == 5e-3 and state.args["steps"] == 6
    assert state.scheduler["base_lrs"] == [5e-3, 5e-3]
    lr_lambda = __import__("pararnn_torch.train", fromlist=["lr_lambda"]).lr_lambda(1, 6, 0.1)
    assert state.optimizer["param_groups"][0]["lr"] == pytest.approx(5e-3 * lr_lambda(6))


def test_the_data_folder_is_never_the_output(tmp_path, corpus):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "docs.jsonl").write_bytes(corpus.read_bytes())
    for out in (data, data / "run"):
        with pytest.raises(ValueError, match="overlaps --data"):
            run(["--out", str(out), "--data", str(data), "--force", *TINY])
    assert [p.name for p in data.iterdir()] == ["docs.jsonl"]


class _Payload:
    """Unpickling this calls Path.touch(marker): what a crafted training_state.pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def _as_legacy(out):
    """Rewrite a run folder's training state in the pickle format of older versions."""
    state = checkpointing.load_run(out)
    (out / checkpointing.STATE_JSON).unlink()
    (out / checkpointing.STATE_TENSORS).unlink()
    plain = {k: getattr(state, k) for k in ("step", "args", "optimizer", "scheduler", "rng")}
    plain["history"] = state.history.__dict__
    return plain


def test_a_pickled_payload_in_the_run_folder_executes_nothing(tmp_path, short_run):
    out = copy_run(short_run[0], tmp_path / "run")
    plain = _as_legacy(out)
    marker = tmp_path / "pwned"
    torch.save({**plain, "args": _Payload(marker)}, out / checkpointing.LEGACY_STATE)
    with pytest.raises(CheckpointError, match="not loaded"):
        run(["--out", str(out), "--resume", "--steps", "6"])
    assert not marker.exists()


def test_an_old_training_state_pt_is_read_safely_and_rewritten(tmp_path, short_run):
    out = copy_run(short_run[0], tmp_path / "run")
    torch.save(_as_legacy(out), out / checkpointing.LEGACY_STATE)
    assert run(["--out", str(out), "--resume", "--steps", "6"])["step"] == 6
    assert checkpointing.load_run(out).step == 6 and not (out / checkpointing.LEGACY_STATE).exists()


def test_training_state_round_trips_through_json_and_safetensors():
    tensors = {}
    value = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2, 2)}},
             "groups": [{"betas": (0.9, 0.95), "params": [0, 1], "fused": None}], "rate": float("nan")}
    data = json.loads(json.dumps(checkpointing.encode(value, "opt", tensors)))
    back = checkpointing.decode(data, tensors, "test")
    assert back["groups"] == [{"betas": (0.9, 0.95), "params": [0, 1], "fused": None}]
    assert torch.equal(back["state"][0]["m"], torch.ones(2, 2)) and back["rate"] != back["rate"]
    with pytest.raises(TypeError, match="cannot store a object"):
        checkpointing.encode({"x": object()}, "opt", {})
