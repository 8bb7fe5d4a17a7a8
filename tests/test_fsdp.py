"""Training at scale: FSDP (one process and 2 gloo processes), sharded checkpoints, export, exact resume,
activation checkpointing, presets and --dry-run, throughput in the log, streaming shards."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pararnn_core import presets, sizing
from pararnn_core.lm_config import LMConfig
from pararnn_torch import data as data_mod
from pararnn_torch.lm import ParaRNNLM
from pararnn_torch.train import run

TINY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--eval-every", "3", "--eval-batches", "1", "--no-progress", "--device", "cpu", "--lr", "1e-2"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    docs = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3 for i in range(40)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    for s in range(4):
        docs = [f"shard {s} document {i}: " + "tokens and more tokens " * (i % 5 + 1) for i in range(25)]
        (folder / f"part-{s}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "part-4.txt").write_text("a plain text shard is one document\n" * 30)
    return folder


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _metrics(folder):
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def _torchrun(args, timeout=300):
    # a new session, so a hung run is killed with all its workers instead of leaving orphans
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "pararnn_torch.train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        stdout, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate()
        pytest.fail(f"2-process FSDP run did not finish in {timeout} s")
    assert launcher.returncode == 0, stderr[-3000:]
    return stdout


def test_fsdp_one_process_equals_plain_training_and_resumes_exactly(tmp_path, corpus):
    common = ["--data", str(corpus), "--steps", "4", "--save-every", "2", *TINY]
    run(["--out", str(tmp_path / "plain"), *common])
    run(["--out", str(tmp_path / "fsdp"), "--fsdp", *common])
    run(["--out", str(tmp_path / "cut"), "--fsdp", *common, "--stop-after", "2"])
    state = json.loads((tmp_path / "cut" / "fsdp_checkpoint" / "training_state.json").read_text())
    assert state["step"] == 2
    assert (tmp_path / "cut" / "model.safetensors").is_file()  # exported when the run stops
    run(["--out", str(tmp_path / "cut"), "--fsdp", *common, "--resume"])
    plain, fsdp, cut = (_weights(tmp_path / n) for n in ("plain", "fsdp", "cut"))
    assert plain.keys() == fsdp.keys() == cut.keys()
    for name in plain:
        assert torch.equal(plain[name], fsdp[name]), name
        assert torch.equal(fsdp[name], cut[name]), name
    losses = lambda folder: [(m["step"], m.get("train_loss"), m.get("eval_loss")) for m in _metrics(folder)]
    assert losses(tmp_path / "plain") == losses(tmp_path / "fsdp") == losses(tmp_path / "cut")
    # the sharded checkpoint holds no pickle of ours: the run state is JSON
    assert not list((tmp_path / "cut").glob("*.pt"))


def test_export_rebuilds_the_weights_from_the_shards(tmp_path, corpus):
    out = tmp_path / "run"
    run(["--out", str(out), "--fsdp", "--data", str(corpus), "--steps", "2", "--save-every", "2", *TINY])
    exported = _weights(out)
    (out / "model.safetensors").unlink()
    run(["--out", str(out), "--export"])
    again = _weights(out)
    for name in exported:
        assert torch.equal(exported[name], again[name]), name
    assert (out / "fsdp_checkpoint" / "training_state.json").is_file()  # kept by the export
    with pytest.raises(SystemExit, match="it is an FSDP run folder: add --fsdp"):
        run(["--out", str(out), "--data", str(corpus), "--steps", "4", *TINY, "--resume"])
    with pytest.raises(SystemExit, match="--export needs an FSDP run folder"):
        run(["--out", str(tmp_path / "nothing"), "--export"])


def test_fsdp_two_gloo_processes_match_one_process_resume_and_convert(tmp_path, corpus):
    common = ["--data", str(corpus), "--steps", "4", "--save-every", "2", *TINY]
    run(["--out", str(tmp_path / "one"), "--fsdp", *common])
    stdout = _torchrun(["--out", str(tmp_path / "two"), "--fsdp", *common, "--stop-after", "2"])
    assert "2 process(es) on cpu, float32, FSDP" in stdout
    _torchrun(["--out", str(tmp_path / "two"), "--fsdp", *common, "--resume"])
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        key = "train_loss" if "train_loss" in a else "eval_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    from pararnn_convert.cli import main as convert

    assert convert(["to-mlx", "--model", str(tmp_path / "two"), "--out", str(tmp_path / "mlx"),
                    "--dtype", "float32"]) == 0
    mlx = load_file(str(tmp_path / "mlx" / "model.safetensors"))
    assert mlx.keys() == b.keys()
    assert torch.allclose(mlx["embed.weight"], b["embed.weight"])


def test_activation_checkpointing_gives_the_same_training_and_less_memory(tmp_path, corpus):
    common = ["--data", str(corpus), "--steps", "2", "--save-every", "2", *TINY]
    run(["--out", str(tmp_path / "plain"), *common])
    run(["--out", str(tmp_path / "ac"), "--activation-checkpointing", "--fsdp", *common])
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ac")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    report = tmp_path / "memory.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "activation_memory.py"), "--d-model", "128",
                    "--layers", "8", "--seq-len", "256", "--batch-size", "4", "--json", str(report)],
                   check=True, timeout=240, capture_output=True)
    measured = json.loads(report.read_text())
    assert measured["same_loss"]
    assert measured["with_mib"] < 0.8 * measured["without_mib"], measured


def test_presets_and_dry_run(capsys):
    config = presets.get_preset("7b").config()
    count = sizing.parameter_count(config)
    assert abs(count / presets.PAPER_PARAMETERS["7b"] - 1) < 0.05
    # the analytic count is the allocated model's (small config: allocating it is cheap)
    small = LMConfig(vocab_size=300, d_model=64, n_layers=3, num_heads=4, tie_embeddings=False)
    assert sizing.parameter_count(small) == sum(p.numel() for p in ParaRNNLM(small).parameters())
    assert run(["--preset", "7b", "--dry-run", "--world-size", "64"]) == {"dry_run": True}
    text = capsys.readouterr().out
    assert f"parameters: {count:,}" in text and "the paper reports 6.76B" in text
    assert "tokens per step: 4,194,304" in text and "DDP" in text and "FSDP" in text
    assert "lr 0.003" in text and "weight decay 0.0001" in text and "cosine to 0" in text
    steps = presets.training_defaults("7b", "gru", presets.PRESET_VOCAB_SIZE)["steps"]
    assert f"warm-up {round(steps / 10):,} steps" in text
    ddp = sizing.memory_per_gpu(config, "ddp", 64, 65536)
    fsdp = sizing.memory_per_gpu(config, "fsdp", 64, 65536)
    assert ddp.model_state == 16 * count and fsdp.model_state == math.ceil(16 * count / 64)
    run(["--preset", "400m", "--dry-run", "--layers", "2"])  # flags override the preset
    assert "2 layers x d_model 1024" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(["--preset", "9b", "--dry-run"])


def test_throughput_is_logged_with_mfu_against_the_given_peak(tmp_path, corpus):
    run(["--out", str(tmp_path / "r"), "--data", str(corpus), "--steps", "2", "--save-every", "2", *TINY,
         "--peak-tflops", "1"])
    lines = [m for m in _metrics(tmp_path / "r") if "train_loss" in m]
    assert all(m["tokens_per_sec"] > 0 and 0 < m["mfu"] < 1 for m in lines)
    config = LMConfig(vocab_size=258, d_model=32, n_layers=2, num_heads=2)
    expected = lines[-1]["tokens_per_sec"] * sizing.training_flops_per_token(config) / 1e12
    assert lines[-1]["mfu"] == pytest.approx(expected, rel=1e-2, abs=1e-5)


def test_streaming_shards_split_by_rank_and_resume_exactly(tmp_path, shards):
    from pararnn_core.tokenizer import TextTokenizer

    tok = TextTokenizer.bytes()
    paths = data_mod.shard_paths(shards)
    ranks = [data_mod.StreamingShards(paths, tok, 16, 0, rank, 2) for rank in (0, 1)]
    assert {p.name for p in ranks[0].paths}.isdisjoint(p.name for p in ranks[1].paths)
    # a stream restored from its cursor continues with the same batches
    stream = data_mod.StreamingShards(paths, tok, 16, 0)
    for step in range(5):
        stream.batch(step, 4)
    saved = stream.state()
    expected = [stream.batch(step, 4) for step in range(5, 40)]  # past one epoch
    again = data_mod.StreamingShards(paths, tok, 16, 0)
    again.load_state(saved)
    for step, batch in zip(range(5, 40), expected):
        got = again.batch(step, 4)
        assert torch.equal(got.inputs, batch.inputs) and torch.equal(got.resets, batch.resets)
    with pytest.raises(RuntimeError, match="read in order"):
        again.batch(3, 4)
    # end to end: an interrupted streaming run resumes to the same weights
    common = ["--data", str(shards), "--streaming", "--steps", "6", "--save-every", "3", *TINY]
    run(["--out", str(tmp_path / "straight"), *common])
    run(["--out", str(tmp_path / "cut"), *common, "--stop-after", "3"])
    run(["--out", str(tmp_path / "cut"), *common, "--resume"])
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(data_mod.DataError, match="2 shard\\(s\\) for 3 processes"):
        data_mod.StreamingShards(paths[:2], tok, 16, 0, 0, 3)
