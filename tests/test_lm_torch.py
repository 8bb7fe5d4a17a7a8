"""PyTorch LM: modes agree, state carry and resets are exact, checkpoints round-trip, bad input is refused."""

import json

import numpy as np
import pytest
import torch

from pararnn_core import checkpoint
from pararnn_core.lm_config import ConfigError, LMConfig
from pararnn_core.tokenizer import TextTokenizer
from pararnn_torch.lm import ParaRNNLM, load_lm, save_lm
from tests.lm_helpers import TEXT, tiny_checkpoint, tiny_config


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_parallel_equals_sequential_logits(cell):
    torch.manual_seed(0)
    model = ParaRNNLM(tiny_config(cell), mode="parallel").double()
    tokens = torch.randint(0, 258, (2, 45))
    resets = torch.zeros(2, 45, dtype=torch.bool)
    resets[0, 17] = resets[1, 3] = True
    parallel = model(tokens, resets=resets)
    model.mode = "sequential"
    sequential = model(tokens, resets=resets)
    assert torch.allclose(parallel, sequential, atol=1e-8, rtol=0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_prefill_then_step_equals_full_forward(cell):
    torch.manual_seed(1)
    model = ParaRNNLM(tiny_config(cell), mode="parallel").double()
    tokens = torch.randint(0, 258, (2, 40))
    full = model(tokens)
    _, state = model(tokens[:, :25], return_state=True)
    stepped = []
    for t in range(25, 40):
        logits, state = model.step(tokens[:, t], state)
        stepped.append(logits)
    assert torch.allclose(torch.stack(stepped, 1), full[:, 25:], atol=1e-8)
    # a parallel continuation from the state is the same as well
    _, state = model(tokens[:, :25], return_state=True)
    assert torch.allclose(model(tokens[:, 25:], state=state), full[:, 25:], atol=1e-8)


def test_resets_isolate_documents_in_conv_and_cell():
    torch.manual_seed(2)
    model = ParaRNNLM(tiny_config("gru"), mode="parallel").double()
    tokens = torch.randint(0, 258, (1, 30))
    resets = torch.zeros(1, 30, dtype=torch.bool)
    resets[0, 11] = True  # the conv (width 4) would otherwise see 3 tokens of the first document
    packed = model(tokens, resets=resets)
    separate = torch.cat([model(tokens[:, :11]), model(tokens[:, 11:])], 1)
    assert torch.allclose(packed, separate, atol=1e-10)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_checkpoint(tmp_path / "ck", cell="lstm", tie_embeddings=False)
    loaded, tokenizer = load_lm(tmp_path / "ck")
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert loaded.config == model.config
    assert tokenizer.encode(TEXT) == list(TEXT.encode())
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model_type"] == "pararnn"


def test_sharded_checkpoint_round_trip(tmp_path):
    torch.manual_seed(3)
    model = ParaRNNLM(tiny_config("gru"))
    summary = save_lm(model, tmp_path / "ck", TextTokenizer.bytes(), max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert checkpoint.INDEX_FILE in files and sum(f.startswith("model-") for f in files) > 1
    assert summary.tensors == len(model.state_dict())
    loaded, _ = load_lm(tmp_path / "ck")
    tokens = torch.randint(0, 258, (1, 9))
    assert torch.equal(model(tokens), loaded(tokens))


def test_mismatches_are_all_reported(tmp_path):
    tiny_checkpoint(tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    config["vocab_size"] = 300  # wrong vocab: embedding shape mismatch
    config["n_layers"] = 3  # a whole layer missing
    (tmp_path / "ck" / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError) as err:
        load_lm(tmp_path / "ck")
    message = str(err.value)
    assert "embed.weight: shape [258, 32], expected [300, 32]" in message
    assert "missing tensors: layers.2." in message


def test_corrupt_and_missing_files(tmp_path):
    tiny_checkpoint(tmp_path / "ck")
    weights = tmp_path / "ck" / checkpoint.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        load_lm(tmp_path / "ck")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_lm(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="needs a config.json"):
        load_lm(tmp_path / "empty")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_lm(tmp_path / "ck")


def test_failed_write_leaves_nothing_and_overwrite_needs_force(tmp_path):
    def failing_writer(tensors, path, metadata):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_checkpoint(
            tmp_path / "ck", {}, {"a": np.zeros(3)}, failing_writer, lambda a: a.nbytes, lambda a: "F64"
        )
    assert list(tmp_path.iterdir()) == []
    tiny_checkpoint(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        save_lm(ParaRNNLM(tiny_config()), tmp_path / "ck", TextTokenizer.bytes())
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown cell 'nope'"):
        LMConfig(cell="nope")
    with pytest.raises(ConfigError, match="d_model must be a positive integer"):
        LMConfig(d_model=0)
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        LMConfig(d_model=30, num_heads=4)
    with pytest.raises(ConfigError, match="model_type"):
        LMConfig.from_dict({"model_type": "llama"})
    assert LMConfig.from_dict(tiny_config("lstm").to_dict()) == tiny_config("lstm")


def test_wrong_token_ids_are_refused():
    model = ParaRNNLM(tiny_config())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 258\)"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="one entry per layer"):
        model(torch.tensor([[1, 2]]), state=[None])


def test_user_cell_is_recorded_and_reimported():
    from tests import lm_user_cell

    config = LMConfig(cell=lm_user_cell.LeakyCell, d_model=16, n_layers=1)
    assert config.cell == "leaky_test" and config.cell_module == "tests.lm_user_cell"
    model = ParaRNNLM(config)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 258)


def test_byte_tokenizer_files_match_the_fast_path():
    tok = TextTokenizer.bytes()
    text = "héllo\twörld ✓ \x00 end"
    assert tok.tokenizer.encode(text).ids == tok.encode(text) == list(text.encode())
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 258 and tok.eos_token_id == 256
