"""MLX LM: torch parity on one checkpoint, prefill + decode, identical greedy tokens in torch, pararnn-generate
and mlx_lm.generate, quantized conversion, conversion and generation errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from pararnn_convert.cli import main as convert_main  # noqa: E402
from pararnn_mlx.generate import main as generate_main  # noqa: E402
from pararnn_mlx.loader import load  # noqa: E402
from tests.lm_helpers import tiny_checkpoint  # noqa: E402

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A torch checkpoint and its float32 MLX conversion."""
    root = tmp_path_factory.mktemp("lm")
    model = tiny_checkpoint(root / "torch", cell="lstm")
    args = ["to-mlx", "--model", str(root / "torch"), "--out", str(root / "mlx"), "--dtype", "float32"]
    assert convert_main(args) == 0
    return model, root


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_torch_and_mlx_logits_match(tmp_path, cell):
    model = tiny_checkpoint(tmp_path / "ck", cell=cell, tie_embeddings=cell == "gru")
    mlx_model, _ = load(tmp_path / "ck")
    tokens = np.random.default_rng(0).integers(0, 258, (2, 300))
    expected = model(torch.from_numpy(tokens)).detach().numpy()
    got = np.array(mlx_model(mx.array(tokens)))
    assert np.abs(got - expected).max() < 1e-4


def test_prefill_then_decode_equals_full_forward(folders):
    _, root = folders
    model, _ = load(root / "mlx")
    tokens = mx.array(np.random.default_rng(1).integers(0, 258, (2, 120)))
    full = np.array(model(tokens))
    cache = model.make_cache()
    model(tokens[:, :80], cache=cache)
    stepped = [np.array(model(tokens[:, t : t + 1], cache=cache)) for t in range(80, 120)]
    assert np.abs(np.concatenate(stepped, 1) - full[:, 80:]).max() < 1e-5


def test_compiled_decode_step_follows_weight_updates(folders):
    """Decoding runs one compiled graph per token whose parameters are implicit inputs: new weights are used."""
    import copy

    _, root = folders
    model, _ = load(root / "mlx")
    tokens = mx.array(np.random.default_rng(2).integers(0, 258, (2, 11)))
    cache = model.make_cache()
    model(tokens[:, :10], cache=cache)
    before = np.array(model(tokens[:, 10:], cache=copy.deepcopy(cache)))  # traces the compiled step
    block = model.layers[0].recurrent
    block.out_proj.weight = block.out_proj.weight * 1.5
    block.cell.recurrent = block.cell.recurrent * 0.5
    compiled = np.array(model(tokens[:, 10:], cache=copy.deepcopy(cache)))
    eager_cache = copy.deepcopy(cache)
    for c in eager_cache:  # padding metadata (no row padded) takes the uncompiled path
        c.lengths = mx.array([1, 1])
    eager = np.array(model(tokens[:, 10:], cache=eager_cache))
    assert np.abs(compiled - eager).max() < 1e-5 < np.abs(compiled - before).max()


def _torch_greedy(model, tokenizer, n):
    ids = model.generate_greedy(torch.tensor(tokenizer.encode(PROMPT)), n)
    eos = model.config.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_greedy_tokens_identical_in_torch_pararnn_generate_and_mlx_lm(folders, capsys):
    from mlx_lm import generate as mlx_lm_generate

    from pararnn_core.tokenizer import TextTokenizer

    torch_model, root = folders
    expected = _torch_greedy(torch_model, TextTokenizer.bytes(), 50)
    model, tokenizer = load(root / "mlx")
    ours = list(_stream_tokens(model, tokenizer, 50))
    assert ours == expected
    text = mlx_lm_generate(model, tokenizer, PROMPT, max_tokens=50)
    assert text == TextTokenizer.bytes().decode([t for t in expected if t < 256])
    # the command lines: pararnn-generate and mlx_lm.generate --trust-remote-code print the same text
    assert generate_main(["--model", str(root / "mlx"), "--prompt", PROMPT, "--max-tokens", "50"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(text) and "Generation:" in printed and "Peak memory:" in printed
    cli = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", str(root / "mlx"), "--trust-remote-code",
         "--prompt", PROMPT, "--max-tokens", "50", "--verbose", "True"],
        capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert text in cli.stdout


def _stream_tokens(model, tokenizer, n):
    from pararnn_mlx.generate import stream

    for response in stream(model, tokenizer, PROMPT, n):
        yield response.token


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_loads_and_generates(tmp_path, bits):
    tiny_checkpoint(tmp_path / "torch", d_model=64, num_heads=1, mlp_size=128)
    out = tmp_path / "q"
    args = ["to-mlx", "--model", str(tmp_path / "torch"), "--out", str(out), "-q", "--q-bits", str(bits),
            "--q-group-size", "32"]
    assert convert_main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    assert config["model_file"] == "pararnn_model.py" and (out / "pararnn_model.py").is_file()
    model, tokenizer = load(out)
    assert type(model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
    assert type(model.embed).__name__ == "QuantizedEmbedding"
    float_model, _ = load(tmp_path / "torch")
    tokens = mx.array([list(PROMPT.encode())])
    error = np.abs(np.array(model(tokens)) - np.array(float_model(tokens))).max()
    assert error < (0.5 if bits == 4 else 0.05)
    assert len(list(_stream_tokens(model, tokenizer, 20))) >= 1


def test_convert_refuses_overwrite_and_bad_sources(folders, tmp_path, capsys):
    _, root = folders
    before = (root / "mlx" / "model.safetensors").read_bytes()
    assert convert_main(["to-mlx", "--model", str(root / "torch"), "--out", str(root / "mlx")]) == 2
    assert "--force" in capsys.readouterr().err
    assert (root / "mlx" / "model.safetensors").read_bytes() == before
    assert convert_main(["to-mlx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # wrong vocab: a tokenizer larger than the model's embedding
    from tokenizers import Tokenizer, models

    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)}, unk_token="w0"))
    big.save(str(tmp_path / "tokenizer.json"))
    args = ["to-mlx", "--model", str(root / "torch"), "--out", str(tmp_path / "o"), "--tokenizer",
            str(tmp_path / "tokenizer.json")]
    assert convert_main(args) == 2
    assert "400 tokens but the model's vocab_size is 258" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_generate_rejects_bad_requests(folders, tmp_path, capsys):
    _, root = folders
    assert generate_main(["--model", str(root / "mlx"), "--prompt", "", "--max-tokens", "5"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert generate_main(["--model", str(root / "mlx"), "--prompt", "x", "--max-tokens", "0"]) == 2
    assert "--max-tokens must be at least 1" in capsys.readouterr().err
    assert generate_main(["--model", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    for flag, value in (("--temp", "nan"), ("--temp", "inf"), ("--top-p", "nan")):
        assert generate_main(["--model", str(root / "mlx"), "--prompt", "x", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} must be") and err.count("\n") == 1
    assert generate_main(["--model", str(root / "mlx"), "--prompt", "x", "--adapter-path", str(tmp_path)]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err


def test_generate_ctrl_c_stops_cleanly_with_the_stats_so_far(folders, capsys, monkeypatch):
    import pararnn_mlx.generate as generate_module

    _, root = folders
    real_stream = generate_module.stream

    def interrupted_after_three(*args, **kwargs):
        for i, response in enumerate(real_stream(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield response

    monkeypatch.setattr(generate_module, "stream", interrupted_after_three)
    assert generate_main(["--model", str(root / "mlx"), "--prompt", PROMPT, "--max-tokens", "50"]) == 130
    captured = capsys.readouterr()
    assert "Generation: 3 tokens" in captured.out and "[interrupted]" in captured.err
    assert "Traceback" not in captured.err


def test_user_tokenizer_is_carried_through_conversion(folders, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, root = folders
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "o"
    assert convert_main(["to-mlx", "--model", str(root / "torch"), "--out", str(out), "--tokenizer",
                         str(tmp_path / "tokenizer.json")]) == 0
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    model, tokenizer = load(out)
    assert tokenizer.encode("ab") == [vocab["a"], vocab["b"]]


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_file_is_shipped_and_used_by_mlx_lm(folders, tmp_path):
    from mlx_lm.utils import load as mlx_lm_load

    _, root = folders
    (tmp_path / "chatml.jinja").write_text(CHATML)
    out = tmp_path / "o"
    assert convert_main(["to-mlx", "--model", str(root / "torch"), "--out", str(out), "--chat-template",
                         str(tmp_path / "chatml.jinja")]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    _, tokenizer = mlx_lm_load(str(out), trust_remote_code=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # without the flag, the byte tokenizer's own transcript template
    _, default = load(root / "mlx")
    assert default.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "system: Be brief.\nuser: hi\nassistant:"


def test_from_apple_import_matches_the_layer(tmp_path, capsys):
    from pararnn_torch import ParaLSTM

    torch.manual_seed(0)
    n, d, h = 8, 6, 2
    apple = {"rnn.A": torch.randn(3, n), "rnn.B": torch.randn(h, d // h, 3, n // h), "rnn.b": torch.randn(3, n),
             "rnn.C": torch.randn(2, n)}
    torch.save(apple, tmp_path / "apple.pt")
    args = ["from-apple", "--checkpoint", str(tmp_path / "apple.pt"), "--out", str(tmp_path / "o"), "--num-heads", "2"]
    assert convert_main(args) == 0
    assert "3 tensors" in capsys.readouterr().out
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "o" / "model.safetensors"))
    reference = ParaLSTM.from_apple_state_dict(apple, num_heads=2)
    for name in ("weight", "bias", "recurrent"):
        assert torch.equal(weights[f"rnn.{name}"], getattr(reference, name).detach())
    assert convert_main(args) == 2  # exists, no --force


USER_CELL_SOURCE = '''
import os
from pararnn_core.cell import Cell, Normal

open(os.environ["PROBE_MARKER"], "w").write("imported")


class ProbeCell(Cell):
    name = "trust_probe"
    gates = ("f", "c")
    state = ("h",)
    params = {"a": Normal(0.1)}

    def step(self, ops, s, u, p):
        f = ops.sigmoid(u.f)
        return (f * s.h + (1 - f) * ops.tanh(p.a * s.h + u.c),)
'''


def test_user_cell_module_is_imported_only_with_trust_remote_code(tmp_path):
    """pararnn-generate passes --trust-remote-code through to the config: without it nothing is imported."""
    import importlib
    import os

    (tmp_path / "probe_cell_module.py").write_text(USER_CELL_SOURCE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()]),
           "PROBE_MARKER": str(tmp_path / "marker")}
    sys.path.insert(0, str(tmp_path))
    os.environ["PROBE_MARKER"] = str(tmp_path / "marker-here")
    try:
        module = importlib.import_module("probe_cell_module")
        tiny_checkpoint(tmp_path / "ck", cell=module.ProbeCell)
    finally:
        sys.path.remove(str(tmp_path))
        del os.environ["PROBE_MARKER"]
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["cell_module"] == "probe_cell_module"
    command = [sys.executable, "-m", "pararnn_mlx.generate", "--model", str(tmp_path / "ck"), "--prompt", "x",
               "--max-tokens", "3"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr and "probe_cell_module" in refused.stderr
    assert not (tmp_path / "marker").exists()
    trusted = subprocess.run([*command, "--trust-remote-code"], capture_output=True, text=True, env=env, timeout=300)
    assert trusted.returncode == 0, trusted.stderr
    assert (tmp_path / "marker").read_text() == "imported"


def test_model_mode_is_a_property_on_both_backends():
    from pararnn_core.lm_config import LMConfig
    from pararnn_mlx.lm import Model, ModelArgs
    from pararnn_torch.lm import ParaRNNLM

    config = LMConfig(vocab_size=40, d_model=16, n_layers=2, num_heads=2)
    for model in (Model(ModelArgs.from_dict(config.to_dict())), ParaRNNLM(config)):
        assert model.mode == "auto"
        model.mode = "sequential"
        assert model.mode == "sequential" and all(b.recurrent.cell.mode == "sequential" for b in model.layers)
