"""pararnn-tasks: the generators' labels against brute-force definitions, determinism, the linear
baseline's linearity, and a few training steps of every task through the CLI (JSON schema)."""

import json

import numpy as np
import pytest
import torch

from pararnn_core.cell import get_cell
from pararnn_torch.tasks.cli import main
from pararnn_torch.tasks.data import IGNORE, TASKS, TaskSettings, generate
from pararnn_torch.tasks.linear_cell import LINEAR_CELL, LinearGatedCell
from pararnn_torch.tasks.models import BUILTIN_MODELS, known_models
from pararnn_torch.tasks.presets import paper_settings, preset_settings

SMALL = {
    "parity": TaskSettings("parity", 24, 2),
    "mqar": TaskSettings("mqar", 24, 16, 3),
    "khop": TaskSettings("khop", 24, 4, 2),
    "keepnth": TaskSettings("keepnth", 24, 16, 5),
}


def _khop_reference(seq, k):
    labels = []
    for t in range(len(seq)):
        pos = t
        for _ in range(k):
            earlier = [j for j in range(pos) if seq[j] == seq[pos]]
            if not earlier:
                pos = None
                break
            pos = earlier[-1] + 1
        labels.append(IGNORE if pos is None else seq[pos])
    return labels


@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_by_seed_and_split(task):
    s = SMALL[task]
    a, b = generate(s, 50, seed=3), generate(s, 50, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], generate(s, 50, seed=4)[0])
    assert not np.array_equal(a[0], generate(s, 50, seed=3, split="test")[0])
    inputs, targets = a
    assert inputs.shape == targets.shape == (50, s.seq_len) and inputs.dtype == targets.dtype == np.int64
    assert inputs.min() >= 0 and inputs.max() < s.vocab_size
    labelled = targets[targets != IGNORE]
    assert labelled.size > 0 and labelled.min() >= 0 and labelled.max() < s.num_classes


def test_parity_labels_are_the_running_xor():
    inputs, targets = generate(SMALL["parity"], 40, seed=0)
    for seq, labels in zip(inputs, targets):
        assert list(labels) == [sum(seq[: t + 1]) % 2 for t in range(len(seq))]


def test_mqar_queries_are_labelled_with_their_keys_values():
    s = SMALL["mqar"]
    inputs, targets = generate(s, 40, seed=0)
    kappa = s.param
    for seq, labels in zip(inputs, targets):
        pairs = dict(zip(seq[0:2 * kappa:2], seq[1:2 * kappa:2]))
        assert len(pairs) == kappa  # distinct keys
        assert set(pairs).isdisjoint(pairs.values())
        assert (labels[: 2 * kappa] == IGNORE).all()
        assert [pairs[q] for q in seq[2 * kappa:]] == list(labels[2 * kappa:])


def test_khop_labels_follow_k_induction_hops():
    s = SMALL["khop"]
    inputs, targets = generate(s, 30, seed=0)
    for seq, labels in zip(inputs, targets):
        assert list(labels) == _khop_reference(list(seq), s.param)
    assert (targets != IGNORE).mean() > 0.5  # most positions are scored with |V| = 4


def test_keepnth_labels_are_the_latest_kept_token():
    s = SMALL["keepnth"]
    inputs, targets = generate(s, 20, seed=0)
    n = s.param
    for seq, labels in zip(inputs, targets):
        for t in range(len(seq)):
            kept = [j for j in range(t + 1) if (j + 1) % n == 0]
            assert labels[t] == (seq[kept[-1]] if kept else IGNORE)


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="vocab_size must be 2"):
        TaskSettings("parity", 10, 3)
    with pytest.raises(ValueError, match="kappa"):
        TaskSettings("mqar", 10, 32, 5)
    with pytest.raises(ValueError, match="unknown task"):
        TaskSettings("copy", 10, 2)


def test_paper_settings_match_the_paper():
    for task, vocab, param in (("parity", 2, 0), ("mqar", 128, 2), ("khop", 5, 2), ("keepnth", 128, 5)):
        s = paper_settings(task)
        assert (s.seq_len, s.d_model, s.state_size, s.num_heads) == (100, 64, 64, 4)
        assert (s.train_samples, s.test_samples, s.batch_size, s.lr) == (10_000, 100_000, 16, 5e-4)
        assert (s.vocab_size, s.task_param, s.mixer_only) == (vocab, param, task == "parity")
        assert preset_settings(task, "cpu").seq_len == 100


def test_linear_baseline_is_linear_in_the_state():
    cell = get_cell(LINEAR_CELL)
    assert isinstance(cell, LinearGatedCell) and LINEAR_CELL not in ("gru", "lstm", "mgu")
    from pararnn_torch import ParaRNN

    torch.manual_seed(0)
    layer = ParaRNN(cell, 8, 8, num_heads=2, mode="sequential").double()
    x = torch.randn(2, 6, 8, dtype=torch.double)
    h_a, h_b = torch.randn(2, 8, dtype=torch.double), torch.randn(2, 8, dtype=torch.double)
    # linear in h0 (affine map): f(a h_a + (1 - a) h_b) = a f(h_a) + (1 - a) f(h_b)
    mix = layer(x, state=0.3 * h_a + 0.7 * h_b)
    torch.testing.assert_close(mix, 0.3 * layer(x, state=h_a) + 0.7 * layer(x, state=h_b))
    # and it runs through the same layer in every mode: auto (the fused sweep on a CPU) and parallel agree
    reference = layer(x)
    for mode in ("auto", "parallel"):
        layer.mode = mode
        torch.testing.assert_close(layer(x), reference)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_trains_a_few_steps_and_writes_the_json(task, tmp_path):
    out = tmp_path / f"{task}.json"
    # parity covers the other cells and two seeds; the other tasks one seed of each kind of model
    models = ["paragru", "linear", "transformer"] if task != "parity" else ["paralstm", "mgu", "linear", "nn_gru"]
    if task == "keepnth":
        models.append("nn_lstm")
    seeds = ["0", "1"] if task == "parity" else ["0"]
    argv = [task, "--preset", "cpu", "--models", *models, "--seeds", *seeds, "--seq-len", "20",
            "--train-samples", "64", "--test-samples", "48", "--eval-samples", "16", "--steps", "4",
            "--eval-every", "2", "--jobs", "1", "--quiet", "--json", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["task"] == task and doc["seeds"] == [int(s) for s in seeds] and doc["settings"]["seq_len"] == 20
    assert {"cpu_count", "torch", "load_average_at_start", "load_average_at_end"} <= set(doc["machine"])
    assert list(doc["results"]) == models
    for model in models:
        for seed in seeds:
            r = doc["results"][model][seed]
            assert 0.0 <= r["test_accuracy"] <= 1.0
            assert r["steps_trained"] == 4 and r["parameters"] > 0 and r["wall_seconds"] > 0
            assert [h["step"] for h in r["history"]] == [2, 4]
            assert r["cpu_seconds"] > 0
            assert r["lr"] == dict(doc["settings"]["model_lr"]).get(model, doc["settings"]["lr"])
    assert out.with_suffix(".png").stat().st_size > 1000


def test_task_parameter_and_vocabulary_overrides_reach_the_data():
    from pararnn_torch.tasks.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["keepnth", "--preset", "cpu", "--task-param", "3", "--vocab-size", "16"])
    task = settings_from_args(args).task_settings
    assert (task.param, task.vocab_size, task.seq_len) == (3, 16, 100)
    inputs, targets = generate(task, 4, seed=0)
    assert inputs.max() < 16 and (targets[:, 2] == inputs[:, 2]).all() and (targets[:, 5] == inputs[:, 5]).all()


@pytest.mark.parametrize("task", ["parity", "keepnth"])
def test_stacked_layers_repeat_the_block(task):
    from pararnn_torch.tasks.trainer import build_model

    settings = preset_settings(task, "cpu")
    one, two = build_model("paragru", settings), build_model("paragru", settings.replace(layers=2))
    embed_and_head = sum(p.numel() for m in (one.embed, one.head) for p in m.parameters())
    extra = sum(p.numel() for p in two.parameters()) - sum(p.numel() for p in one.parameters())
    if task == "parity":  # mixer only: the second mixer reads the first's state_size outputs
        assert len(two.mixers) == 2 and extra == sum(p.numel() for p in two.mixers[1].parameters())
    else:
        assert len(two.blocks) == 2 and extra == one.num_parameters() - embed_and_head - sum(
            p.numel() for p in one.norm_out.parameters())
    tokens = torch.randint(0, settings.vocab_size, (2, 12))
    assert two(tokens).shape == (2, 12, settings.vocab_size)
    with pytest.raises(ValueError, match="layers must be at least 1"):
        build_model("paragru", settings.replace(layers=0))


def test_user_cell_through_cell_module(tmp_path):
    out = tmp_path / "r.json"
    # parallel mode: no fused kernel to compile for this cell
    argv = ["parity", "--models", "leaky_test", "--cell-module", "tests.lm_user_cell", "--seeds", "0",
            "--mode", "parallel", "--seq-len", "10", "--train-samples", "32", "--test-samples", "16",
            "--eval-samples", "16", "--steps", "2", "--eval-every", "2", "--jobs", "1", "--quiet", "--json", str(out)]
    assert main(argv) == 0
    assert "leaky_test" in json.loads(out.read_text())["results"]
    assert "leaky_test" in known_models() and "leaky_test" not in BUILTIN_MODELS


@pytest.mark.parametrize("argv, message", [
    (["parity", "--models", "nope"], "unknown model"),
    (["parity", "--cell-module", "no_such_module_xyz"], "cannot be imported"),
    (["parity", "--steps", "0"], "--steps must be at least 1"),
    (["parity", "--json", "/no/such/dir/out.json"], "does not exist"),
    (["parity", "--mode", "fast"], "--mode must be one of"),
    (["keepnth", "--task-param", "100"], "keepnth needs n < seq_len, got n=100, seq_len=100"),
    (["parity", "--vocab-size", "3"], "parity reads bits: vocab_size must be 2, got 3"),
    (["mqar", "--task-param", "40", "--vocab-size", "64"], "mqar needs vocab_size >= 2*kappa"),
])
def test_cli_errors_are_one_line_with_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
