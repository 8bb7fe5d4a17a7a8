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
from pararnn_core.cli_args import CLIError
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
    with pytest.raises(CLIError, match="it is an FSDP run folder: add --fsdp"):
        run(["--out", str(out), "--data", str(corpus), "--steps", "4", *TINY, "--resume"])
    # the resume checks cover the scale flags: a preset counts as giving its flags, streaming is fixed
    with pytest.raises(CLIError, match=r"--d-model 1024 \(the run has 32\);.* --preset 400m \(the run has None\)"):
        run(["--out", str(out), "--fsdp", "--preset", "400m", "--resume"])
    with pytest.raises(CLIError, match=r"--streaming True \(the run has False\)"):
        run(["--out", str(out), "--fsdp", "--streaming", "--resume"])
    with pytest.raises(CLIError, match="--export needs an FSDP run folder"):
        run(["--out", str(tmp_path / "nothing"), "--export"])


def test_fsdp_two_gloo_processes_match_one_process_resume_resharded_and_convert(tmp_path, corpus):
    # one torchrun launch: 2 processes train steps 1-2 (and evaluate at step 2), export and stop; the run then
    # resumes in this process (DCP reshards 2 -> 1) and must end where one process alone ends
    common = ["--data", str(corpus), "--steps", "4", "--save-every", "2", *TINY, "--eval-every", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(["--out", str(one), "--fsdp", *common, "--stop-after", "2"])
    one_at_2 = _weights(one)
    run(["--out", str(one), "--fsdp", *common, "--resume"])
    stdout = _torchrun(["--out", str(two), "--fsdp", *common, "--stop-after", "2"])
    assert "2 process(es) on cpu, float32, FSDP" in stdout
    assert sorted(p.name for p in (two / "fsdp_checkpoint").glob("rank-*")) == [
        "rank-00000.safetensors", "rank-00001.safetensors"]
    assert not [p.name for p in two.iterdir() if ".tmp-" in p.name]  # the staging folder was committed
    two_at_2 = _weights(two)  # gathered from the 2 processes' shards
    for name in one_at_2:
        assert torch.allclose(one_at_2[name], two_at_2[name], atol=1e-5), name
    from pararnn_convert.cli import main as convert

    assert convert(["to-mlx", "--model", str(two), "--out", str(tmp_path / "mlx"), "--dtype", "float32"]) == 0
    mlx = load_file(str(tmp_path / "mlx" / "model.safetensors"))
    assert mlx.keys() == two_at_2.keys()
    assert torch.allclose(mlx["embed.weight"], two_at_2["embed.weight"])
    run(["--out", str(two), "--fsdp", *common, "--resume"])
    a, b = _metrics(one), _metrics(two)
    assert len(a) == len(b) == 6  # 4 train lines, eval at steps 2 and 4
    for x, y in zip(a, b):
        key = "train_loss" if "train_loss" in x else "eval_loss"
        assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x, y)
    a, b = _weights(one), _weights(two)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


#: (fault point, its n-th occurrence, no-exchange protocol, step of the sharded state left): the 3-step run
#: commits its run folder (config, tokenizer) once, then its shards at steps 1 (placed) and 2 (a replacement,
#: which is killed: shards half written, exchanged but the old version not deleted, and with the rename
#: fallback between moving the old aside and the new in, where fsdp_checkpoint/ is missing). The other points
#: are the same code (safe_folder.commit) as in test_fault_injection_cli.py.
FSDP_FAULTS = [
    ("staging-partial", 2, False, 1),
    ("swapped", 1, False, 2),
    ("old-moved-aside", 1, True, None),
]


def test_fsdp_killed_during_a_sharded_save_resumes_to_the_same_weights(tmp_path, corpus):
    from pararnn_core import safe_folder
    from pararnn_torch import checkpointing
    from tests.test_checkpoint_safety import run_plan

    flags = ["--fsdp", "--data", str(corpus), "--steps", "3", "--save-every", "1", *TINY]
    plan = [{"entry": "train", "argv": ["--out", str(tmp_path / f"killed-{point}"), *flags],
             "fault": f"{point}@{nth}", "no_exchange": no_exchange} for point, nth, no_exchange, _ in FSDP_FAULTS]
    was_killed, stderr = run_plan(tmp_path, plan, timeout=300)
    assert all(was_killed), (was_killed, stderr[-3000:])
    run(["--out", str(tmp_path / "straight"), *flags])
    reference = _weights(tmp_path / "straight")
    for item, (point, _, _, step) in zip(plan, FSDP_FAULTS):
        out = Path(item["argv"][1])
        sharded = out / "fsdp_checkpoint"
        if step is None:  # the next writer puts the complete new version back
            assert not sharded.exists() and safe_folder.missing_hint(sharded), point
        else:
            assert checkpointing.load_run(sharded).step == step, point
        assert run(["--out", str(out), *flags, "--resume"])["step"] == 3, point
        weights = _weights(out)
        for name, value in reference.items():
            assert torch.equal(weights[name], value), (point, name)
        assert safe_folder.leftovers(sharded) == [] and safe_folder.leftovers(out) == [], point


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
