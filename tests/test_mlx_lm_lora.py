"""mlx_lm.lora on a converted ParaRNN folder (the command line, and mlx-lm's train_model -> tuner.train with
its mx.compile'd step) lowers the validation loss for LoRA, DoRA, full and 4-bit QLoRA fine-tuning, and the
adapters load in mlx_lm (load(adapter_path=...)) and pararnn_mlx.load with the same greedy tokens."""

import json
import subprocess
import sys
import types

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.lora import CONFIG_DEFAULTS, build_parser, train_model  # noqa: E402
from mlx_lm.tuner.callbacks import TrainingCallback  # noqa: E402
from mlx_lm.tuner.datasets import load_dataset  # noqa: E402
from mlx_lm.utils import load as mlx_lm_load  # noqa: E402

from pararnn_convert.cli import main as convert_main  # noqa: E402
from pararnn_mlx.loader import load  # noqa: E402
from tests.lm_helpers import TEXT, tiny_checkpoint  # noqa: E402

PROMPT = "def add("


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A float32 conversion, a 4-bit one (QLoRA) and a small text data set in mlx-lm's jsonl layout."""
    root = tmp_path_factory.mktemp("lora")
    tiny_checkpoint(root / "torch", d_model=64, num_heads=2, mlp_size=128)
    base = ["to-mlx", "--model", str(root / "torch")]
    assert convert_main([*base, "--out", str(root / "float"), "--dtype", "float32"]) == 0
    assert convert_main([*base, "--out", str(root / "q4"), "--dtype", "float32", "-q", "--q-bits", "4",
                         "--q-group-size", "32"]) == 0
    data = root / "data"
    data.mkdir()
    lines = [json.dumps({"text": f"{TEXT}# {i}\n"}) for i in range(16)]
    (data / "train.jsonl").write_text("\n".join(lines[:12]) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[12:]) + "\n")
    return root


class ValidationLosses(TrainingCallback):
    def __init__(self):
        self.losses = []

    def on_val_loss_report(self, info):
        self.losses.append(info["val_loss"])


def _lora_args(model_folder, data, adapters, fine_tune_type):
    """The arguments mlx_lm.lora's command line would give train_model."""
    argv = ["--model", str(model_folder), "--train", "--data", str(data), "--fine-tune-type", fine_tune_type,
            "--num-layers", "2", "--iters", "6", "--batch-size", "4", "--steps-per-eval", "6", "--val-batches", "1",
            "--learning-rate", "1e-2", "--max-seq-length", "64", "--adapter-path", str(adapters)]
    args = vars(build_parser().parse_args(argv))
    for key, value in CONFIG_DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    return types.SimpleNamespace(**args)


def _greedy(model, tokenizer, n=12):
    return [int(t) for t, _ in generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=n)]


def _mean_next_token_loss(model, tokenizer, text):
    """Cross-entropy of each next byte of text under model (the quantity mlx_lm.lora's validation reports)."""
    tokens = mx.array(tokenizer.encode(text))[None]
    logits = model(tokens[:, :-1]).astype(mx.float32)
    target = mx.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    return (mx.logsumexp(logits, axis=-1) - target).mean().item()


@pytest.mark.parametrize("fine_tune_type, source", [("lora", "float"), ("dora", "float"), ("full", "float"),
                                                     ("lora", "q4")])
def test_mlx_lm_lora_training_lowers_validation_loss(folders, fine_tune_type, source):
    adapters = folders / f"adapters-{fine_tune_type}-{source}"
    mx.random.seed(0)  # the adapters' initialisation, as mlx_lm.lora's main seeds it
    model, tokenizer = load(folders / source)
    args = _lora_args(folders / source, folders / "data", adapters, fine_tune_type)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    losses = ValidationLosses()
    train_model(args, model, train_set, valid_set, losses)
    assert len(losses.losses) == 2 and losses.losses[-1] < losses.losses[0] - 0.1, losses.losses
    assert (adapters / "adapters.safetensors").is_file()

    ours, tokenizer = load(folders / source, adapter_path=adapters)
    theirs, _ = mlx_lm_load(str(folders / source), adapter_path=str(adapters), trust_remote_code=True)
    assert _greedy(ours, tokenizer) == _greedy(theirs, tokenizer)
    # What was saved is what was trained: the loaded adapters fit the held-out text better than the base.
    # (Greedy tokens of so short a run can coincide with the base model's, so they prove nothing here.)
    untuned, _ = load(folders / source)
    held_out = f"{TEXT}# 13\n"
    assert _mean_next_token_loss(ours, tokenizer, held_out) < _mean_next_token_loss(untuned, tokenizer, held_out) - 0.1


def test_lora_command_line(folders):
    """`mlx_lm.lora --train` exactly as a user types it."""
    adapters = folders / "adapters-cli"
    cli = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "lora", "--model", str(folders / "float"), "--trust-remote-code", "--train",
         "--data", str(folders / "data"), "--num-layers", "2", "--iters", "4", "--batch-size", "4",
         "--steps-per-eval", "4", "--val-batches", "1", "--max-seq-length", "64", "--adapter-path", str(adapters)],
        capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert (adapters / "adapters.safetensors").is_file()
