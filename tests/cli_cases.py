"""The shared table of bad inputs and faults for the command-line tools (used by tests/test_cli_errors.py).

Each case runs one tool's ``main(argv)`` and expects exit status 2 with one line on stderr,
``<tool>: error: ...`` containing ``expect``, no traceback, and (``no_output``) no ``{tmp}/out``.
``{tmp}`` is the test's folder; ``setup`` makes its input files; ``fault`` names a simulated
fault (``enospc``: the backend's weight writer fails with ENOSPC; ``locked``: another process
holds the lock of ``{tmp}/out``; ``race``: someone creates ``{tmp}/out`` while the weights are written).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TRAIN_TINY = ["--d-model", "16", "--layers", "1", "--seq-len", "16", "--batch-size", "2", "--steps", "2",
              "--eval-every", "2", "--eval-batches", "1", "--no-progress", "--device", "cpu"]


@dataclass
class Case:
    id: str
    tool: str  # train | convert | demo
    argv: list[str]
    expect: str
    setup: Callable[[Path], None] | None = None
    fault: str | None = None
    no_output: bool = True
    backends: tuple = field(default=("torch",))


def corpus(tmp: Path, docs: int = 40):
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 3 for i in range(docs)]
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def non_utf8_jsonl(tmp: Path):
    (tmp / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')


def data_folder(tmp: Path):
    (tmp / "corpus").mkdir()
    corpus(tmp / "corpus")


def torch_checkpoint(tmp: Path):
    from tests.lm_helpers import tiny_checkpoint

    tiny_checkpoint(tmp / "src")


def bad_chat_templates(tmp: Path):
    torch_checkpoint(tmp)
    (tmp / "syntax.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n")
    (tmp / "drops.jinja").write_text("{% for m in messages %}{{ m['role'] }}: ...\n{% endfor %}")
    (tmp / "raises.jinja").write_text("{{ raise_exception('only one user message, please') }}")
    (tmp / "latin1.jinja").write_bytes(b"{{ messages[0]['content'] }} caf\xe9")


def existing_out(tmp: Path):
    torch_checkpoint(tmp)
    (tmp / "out").mkdir()


def apple_non_tensor(tmp: Path):
    import torch

    torch.save({"cell.A": "not a tensor", "cell.B": torch.zeros(1, 4, 3, 4), "cell.b": torch.zeros(3, 4)},
               tmp / "apple.pt")


def apple_checkpoint(tmp: Path):
    import torch

    torch.save({"cell.A": torch.randn(3, 4), "cell.B": torch.randn(1, 4, 3, 4), "cell.b": torch.randn(3, 4)},
               tmp / "apple.pt")


def corrupt_file(tmp: Path):
    (tmp / "apple.pt").write_bytes(b"garbage, not a checkpoint")


T = ["--out", "{tmp}/out", "--data", "{tmp}/docs.jsonl", *TRAIN_TINY]
CASES = [
    # numbers: NaN, infinities, out-of-range values are refused while parsing
    Case("train-lr-nan", "train", [*T, "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
    Case("train-lr-inf", "train", [*T, "--lr", "inf"], "argument --lr: expected a finite number, got 'inf'"),
    Case("train-lr-negative", "train", [*T, "--lr", "-1"], "argument --lr: expected a number > 0"),
    Case("train-grad-clip-nan", "train", [*T, "--grad-clip", "nan"], "argument --grad-clip: expected a finite"),
    Case("train-weight-decay-inf", "train", [*T, "--weight-decay=-inf"], "--weight-decay: expected a finite"),
    Case("train-z-loss-nan", "train", [*T, "--z-loss", "NaN"], "argument --z-loss: expected a finite"),
    Case("train-min-lr-ratio-nan", "train", [*T, "--min-lr-ratio", "nan"], "--min-lr-ratio: expected a finite"),
    Case("train-min-lr-ratio-above-1", "train", [*T, "--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1]",
         setup=corpus),
    Case("train-eval-fraction-1", "train", [*T, "--eval-fraction", "1"], "expected a fraction in [0, 1)"),
    Case("train-steps-0", "train", [*T, "--steps", "0"], "argument --steps: expected an integer >= 1"),
    Case("train-seq-len-text", "train", [*T, "--seq-len", "long"], "argument --seq-len: expected an integer"),
    Case("train-bad-device", "train", [*T, "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    Case("train-unknown-flag", "train", [*T, "--learning-rate", "1"], "unrecognized arguments: --learning-rate"),
    # data
    Case("train-seq-len-over-train-split", "train", [*T, "--seq-len", "100000"],
         "the training split has", setup=corpus),
    Case("train-seq-len-over-eval-split", "train", [*T, "--seq-len", "300"],
         "the evaluation split (--eval-fraction 0.02) has", setup=corpus),
    Case("train-non-utf8-jsonl", "train", ["--out", "{tmp}/out", "--data", "{tmp}/bad.jsonl", *TRAIN_TINY],
         "bad.jsonl:2 is not UTF-8", setup=non_utf8_jsonl),
    Case("train-missing-data", "train", T, "docs.jsonl does not exist"),
    Case("train-data-is-out", "train", ["--out", "{tmp}/corpus", "--data", "{tmp}/corpus", "--force", *TRAIN_TINY],
         "overlaps --data", setup=data_folder, no_output=False),
    Case("train-out-inside-data", "train", ["--out", "{tmp}/corpus/run", "--data", "{tmp}/corpus", *TRAIN_TINY],
         "overlaps --data", setup=data_folder),
    # model and run folder
    Case("train-unknown-cell", "train", [*T, "--cell", "nope"], "unknown cell 'nope'", setup=corpus),
    Case("train-heads-not-dividing", "train", [*T, "--heads", "3"], "not divisible by num_heads", setup=corpus),
    Case("train-resume-nothing", "train", [*T, "--resume"], "--resume, but", setup=corpus),
    Case("train-resume-and-force", "train", [*T, "--resume", "--force"], "pass one of them", setup=corpus),
    # faults
    Case("train-disk-full", "train", T, "no space left on device", setup=corpus, fault="enospc"),
    Case("train-locked", "train", T, "is in use by lock-holder (pid", setup=corpus, fault="locked"),
    # pararnn-convert to-mlx
    Case("to-mlx-missing-model", "convert", ["to-mlx", "--model", "{tmp}/nowhere", "--out", "{tmp}/out"],
         "does not exist", backends=("mlx",)),
    Case("to-mlx-out-is-model", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/src", "--force"],
         "overlaps --model", setup=torch_checkpoint, no_output=False, backends=("mlx",)),
    Case("to-mlx-out-contains-model", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}", "--force"],
         "overlaps --model", setup=torch_checkpoint, no_output=False, backends=("mlx",)),
    Case("to-mlx-out-exists", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out"],
         "already exists; pass --force", setup=existing_out, no_output=False, backends=("mlx",)),
    Case("to-mlx-bad-q-bits", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out", "-q",
                                          "--q-bits", "3"], "argument --q-bits: invalid choice", backends=("mlx",)),
    Case("to-mlx-disk-full", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out"],
         "no space left on device", setup=torch_checkpoint, fault="enospc", backends=("mlx",)),
    Case("to-mlx-locked", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out"],
         "is in use by lock-holder (pid", setup=torch_checkpoint, fault="locked", backends=("mlx",)),
    Case("to-mlx-chat-template-missing", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out",
                                                     "--chat-template", "{tmp}/none.jinja"],
         "none.jinja not found (expected a Jinja template file)", setup=torch_checkpoint, backends=("mlx",)),
    Case("to-mlx-chat-template-syntax", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out",
                                                    "--chat-template", "{tmp}/syntax.jinja"],
         "syntax.jinja: line 2: unexpected '}'", setup=bad_chat_templates, backends=("mlx",)),
    Case("to-mlx-chat-template-drops", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out",
                                                   "--chat-template", "{tmp}/drops.jinja"],
         "leaves the messages' content out", setup=bad_chat_templates, backends=("mlx",)),
    Case("to-mlx-chat-template-raises", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out",
                                                    "--chat-template", "{tmp}/raises.jinja"],
         "fails on a sample conversation (user, assistant, user): only one user message", setup=bad_chat_templates,
         backends=("mlx",)),
    Case("to-mlx-chat-template-not-utf8", "convert", ["to-mlx", "--model", "{tmp}/src", "--out", "{tmp}/out",
                                                      "--chat-template", "{tmp}/latin1.jinja"],
         "is not UTF-8 text (byte 32)", setup=bad_chat_templates, backends=("mlx",)),
    # pararnn-convert from-apple
    Case("from-apple-non-tensor", "convert", ["from-apple", "--checkpoint", "{tmp}/apple.pt", "--out", "{tmp}/out"],
         "'cell.A' holds a str, expected a tensor", setup=apple_non_tensor),
    Case("from-apple-heads-0", "convert", ["from-apple", "--checkpoint", "{tmp}/apple.pt", "--out", "{tmp}/out",
                                           "--num-heads", "0"], "argument --num-heads: expected an integer >= 1"),
    Case("from-apple-missing", "convert", ["from-apple", "--checkpoint", "{tmp}/apple.pt", "--out", "{tmp}/out"],
         "apple.pt not found"),
    Case("from-apple-corrupt", "convert", ["from-apple", "--checkpoint", "{tmp}/apple.pt", "--out", "{tmp}/out"],
         "is not a readable PyTorch checkpoint", setup=corrupt_file),
    Case("from-apple-out-holds-source", "convert", ["from-apple", "--checkpoint", "{tmp}/apple.pt", "--out", "{tmp}",
                                                    "--force"], "overlaps --checkpoint", setup=apple_checkpoint,
         no_output=False),
    Case("from-apple-disk-full", "convert", ["from-apple", "--checkpoint", "{tmp}/apple.pt", "--out", "{tmp}/out"],
         "no space left on device", setup=apple_checkpoint, fault="enospc"),
    Case("from-apple-out-created-meanwhile", "convert", ["from-apple", "--checkpoint", "{tmp}/apple.pt", "--out",
                                                         "{tmp}/out"], "created by someone else while this one was "
         "being written; nothing was replaced", setup=apple_checkpoint, fault="race", no_output=False),
    # pararnn-demo
    Case("demo-temp-nan", "demo", ["--out", "{tmp}/out", "--temp", "nan"], "argument --temp: expected a finite"),
    Case("demo-top-p-0", "demo", ["--out", "{tmp}/out", "--top-p", "0"], "argument --top-p: expected a number > 0"),
]
