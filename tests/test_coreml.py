"""Core ML export (pararnn-convert to-coreml): package structure on Linux, parity of the torch
export module with the reference model, compression, and (macOS only) Core ML predictions.

Three conversions run here (about 20-40 s each on a loaded 2-core machine): a 2-layer GRU in
float32 through the CLI, and 1-layer LSTM / user-cell models in float16 with int8 / int4 weights.
"""

from __future__ import annotations

import json
import platform
import sys

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install '.[coreml]')")

from pararnn_convert import cli  # noqa: E402
from pararnn_convert.coreml import (  # noqa: E402
    COMPRESS_WEIGHT_THRESHOLD,
    FUNCTIONS,
    METADATA_PREFIX,
    compress,
    to_coreml,
    tokenizer_dir_for,
)
from pararnn_convert.coreml_module import (  # noqa: E402
    StatefulLM,
    check_parity,
    load_reference,
    reference_state_tensors,
    state_specs,
)
from pararnn_convert.coreml_options import CoreMLOptions  # noqa: E402
from tests import lm_user_cell  # noqa: E402
from tests.lm_helpers import tiny_checkpoint  # noqa: E402

PREFILL = 3

CASES = {
    # name: (cell, layers, options)
    "gru": ("gru", 2, CoreMLOptions(precision="float32", prefill_length=PREFILL, parity_steps=5)),
    "lstm": ("lstm", 1, CoreMLOptions(compress="int8", prefill_length=PREFILL, parity_steps=5)),
    "user": (lm_user_cell.LeakyCell, 1, CoreMLOptions(compress="int4", prefill_length=PREFILL, parity_steps=5)),
}
#: one head: the cell's input projection has 32 inputs per head, a whole int4 block
CHECKPOINT_OPTIONS = {"user": {"num_heads": 1}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("coreml_ckpt")
    for name, (cell, layers, _) in CASES.items():
        tiny_checkpoint(root / name, cell=cell, n_layers=layers, **CHECKPOINT_OPTIONS.get(name, {}))
    return root


@pytest.fixture(scope="module")
def packages(checkpoints, tmp_path_factory):
    """name -> path of the converted package; the GRU goes through the CLI (and its output is kept)."""
    out = tmp_path_factory.mktemp("coreml_out")
    paths, cli_output = {}, {}
    for name, (_, _, options) in CASES.items():
        paths[name] = out / f"{name}.mlpackage"
        if name == "gru":
            argv = ["to-coreml", "--model", str(checkpoints / name), "--out", str(paths[name]),
                    "--precision", options.precision, "--prefill-length", str(options.prefill_length),
                    "--parity-steps", str(options.parity_steps), "--author", "tests", "--license", "MIT",
                    "--model-version", "0.3"]
            cli_output[name] = _run_cli(argv)
        else:
            to_coreml(checkpoints / name, paths[name], options)
    return paths, cli_output


def _run_cli(argv):
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def _spec(path):
    return ct.models.MLModel(str(path), skip_model_load=True).get_spec()


# ----------------------------------------------------------------------------
# the package


def test_cli_converts_and_prints_parity(packages):
    paths, cli_output = packages
    code, stdout, stderr = cli_output["gru"]
    assert code == 0, stderr
    assert f"wrote {paths['gru']}" in stdout
    parity_line = stdout.strip().splitlines()[-1]
    assert parity_line.startswith("parity (torch export module vs pararnn_torch reference, float32)")
    assert "greedy tokens same" in parity_line


@pytest.mark.parametrize("name", list(CASES))
def test_spec_declares_fixed_inputs_outputs_and_states(packages, checkpoints, name):
    paths, _ = packages
    _, _, options = CASES[name]
    config = load_reference(checkpoints / name)[0].config
    desc = _spec(paths[name]).description
    assert desc.defaultFunctionName == "decode"
    functions = {f.name: f for f in desc.functions}
    assert sorted(functions) == sorted(FUNCTIONS)
    specs = state_specs(config)
    for fname, length in (("decode", 1), ("prefill", options.prefill_length)):
        f = functions[fname]
        # one token-id input and one logits output: the state is not an input or an output
        assert [i.name for i in f.input] == ["input_ids"] and [o.name for o in f.output] == ["logits"]
        ids = f.input[0].type.multiArrayType
        assert list(ids.shape) == [1, length] and ids.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.INT32
        assert ids.WhichOneof("ShapeFlexibility") is None, "the token input must not grow with the context"
        logits = f.output[0].type.multiArrayType
        assert list(logits.shape) == [1, config.vocab_size]
        assert logits.dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
        states = {s.name: s.type.stateType.arrayType for s in f.state}
        assert list(states) == [s.name for s in specs]
        for s in specs:
            assert tuple(states[s.name].shape) == s.shape
            assert states[s.name].dataType == ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    cell_states = [s.shape for s in specs if s.name.startswith("cell_state")]
    assert all(shape[1] == config.resolve_cell().state_size for shape in cell_states)


def test_metadata_and_tokenizer_files(packages, checkpoints):
    paths, _ = packages
    desc = _spec(paths["gru"]).description
    meta = desc.metadata
    assert (meta.author, meta.license, meta.versionString) == ("tests", "MIT", "0.3")
    user = dict(meta.userDefined)
    config, _ = load_reference(checkpoints / "gru")
    assert json.loads(user[METADATA_PREFIX + "config"]) == config.config.to_dict()
    assert user[METADATA_PREFIX + "tokenizer_kind"] == "bytes"
    assert json.loads(user[METADATA_PREFIX + "states"]) == {s.name: list(s.shape) for s in state_specs(config.config)}
    assert json.loads(user[METADATA_PREFIX + "functions"]) == {"decode": 1, "prefill": PREFILL}
    tok_dir = tokenizer_dir_for(paths["gru"])
    files = sorted(p.name for p in tok_dir.iterdir())
    assert files == json.loads(user[METADATA_PREFIX + "tokenizer_files"])
    assert user[METADATA_PREFIX + "tokenizer_dir"] == tok_dir.name
    for name in files:
        assert (tok_dir / name).read_bytes() == (checkpoints / "gru" / name).read_bytes()
    assert desc.functions[0].input[0].shortDescription.startswith("decode: token ids")
    leftovers = [p.name for p in paths["gru"].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "temporary files were left beside the package"


def _weight_bytes(path) -> int:
    return (path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size


def _is_weight_matrix(name: str) -> bool:
    return name.endswith(("proj.weight", "cell.weight")) or name in ("embed.weight", "lm_head.weight")


def _expected_weight_bytes(checkpoint, bits_matrices: float, bits_rest: int) -> float:
    """Bytes of the model's weights stored once (decode and prefill share them): the weight matrices
    above the compression threshold at ``bits_matrices`` bits per element, the rest at ``bits_rest``."""
    model, _ = load_reference(checkpoint)
    total = 0.0
    for name, tensor in model.state_dict().items():
        compressed = _is_weight_matrix(name) and tensor.numel() > COMPRESS_WEIGHT_THRESHOLD
        total += tensor.numel() * (bits_matrices if compressed else bits_rest) / 8
    return total


def test_weights_stored_once_across_functions(packages, checkpoints):
    paths, _ = packages
    expected = _expected_weight_bytes(checkpoints / "gru", 32, 32)  # float32, uncompressed
    # each blob has a 64-byte header and alignment: a few KB at most over the raw tensor bytes
    assert expected <= _weight_bytes(paths["gru"]) <= expected * 1.1 + 8192


@pytest.mark.parametrize("name, bits", [("lstm", 8 + 16 / 32), ("user", 4 + 16 / 32)])
def test_compressed_export_is_smaller_by_the_expected_factor(packages, checkpoints, name, bits):
    # int8 per output channel (one fp16 scale per row of 32 weights here), int4 per block of 32 (one fp16
    # scale per block): against float16 the weight matrices shrink by 16 / bits, the rest stays float16
    paths, _ = packages
    found = _weight_bytes(paths[name])
    float16 = _expected_weight_bytes(checkpoints / name, 16, 16)
    compressed = _expected_weight_bytes(checkpoints / name, bits, 16)
    assert compressed * 0.95 - 4096 <= found <= compressed * 1.1 + 8192, (found, compressed, float16)
    assert found < float16 * (0.62 if bits < 8 else 0.8)


def test_palettization_writes_lookup_tables():
    # a tiny ML Program with one large linear layer, palettized with k-means to 4 bits
    pytest.importorskip("sklearn", reason="k-means palettization needs scikit-learn (the coreml extra installs it)")
    from coremltools.converters.mil import Builder as mb

    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=weight)

    mlmodel = ct.convert(prog, minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    ops = [op.op_type for op in compress(mlmodel, "palettize4")._mil_program.functions["main"].operations]
    assert "constexpr_lut_to_dense" in ops


# ----------------------------------------------------------------------------
# the torch export module against the reference model


@pytest.mark.parametrize("name", list(CASES))
def test_export_module_matches_reference_for_prefill_and_50_decode_steps(checkpoints, name):
    reference, _ = load_reference(checkpoints / name)
    prefill, decode = StatefulLM(reference, PREFILL), StatefulLM(reference, 1)
    prompt = torch.tensor([10, 200, 33])
    report = check_parity(reference, prefill, decode, prompt, steps=50)
    assert report.within(1e-4), report.describe()
    # and the state after each step equals the reference step's, step by step
    prefill.reset_state()
    prefill(prompt[None].to(torch.int32))
    _, state = reference(prompt[None], return_state=True)
    for buffer, value in prefill.state_tensors().items():
        getattr(decode, buffer).copy_(value)
    token = torch.tensor([7])
    for _ in range(50):
        ref_logits, state = reference.step(token, state)
        logits = decode(token.to(torch.int32)[None])
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
        expected = reference_state_tensors(reference, state)
        for buffer, value in decode.state_tensors().items():
            torch.testing.assert_close(value, expected[buffer], atol=1e-4, rtol=0)
        token = ref_logits.argmax(-1)


# ----------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2, nothing written


def _assert_refused(argv, needle, out):
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    code, stdout, stderr = _run_cli(argv)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pararnn-convert: error: ") and needle in lines[0], stderr
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert after == before


def test_bad_input_is_refused_in_one_line(checkpoints, tmp_path):
    src, out = str(checkpoints / "gru"), tmp_path / "m.mlpackage"
    existing = tmp_path / "existing.mlpackage"
    existing.mkdir()
    _assert_refused(["to-coreml", "--model", str(tmp_path / "missing"), "--out", str(out)], "does not exist", out)
    _assert_refused(["to-coreml", "--model", src, "--out", str(existing)], "already exists", existing)
    _assert_refused(["to-coreml", "--model", src, "--out", str(out), "--precision", "bfloat16"], "--precision", out)
    _assert_refused(["to-coreml", "--model", src, "--out", str(out), "--compress", "int2"], "--compress", out)
    _assert_refused(["to-coreml", "--model", src, "--out", str(out), "--target", "iOS17"], "--target", out)
    _assert_refused(["to-coreml", "--model", src, "--out", str(tmp_path / "m.mlmodel")], ".mlpackage", out)
    _assert_refused(["to-coreml", "--model", src, "--out", str(out), "--prefill-length", "0"], "prefill", out)


def test_mlx_folders_load_as_the_reference(checkpoints, tmp_path):
    pytest.importorskip("mlx.core", reason="mlx is not installed")
    from pararnn_convert.to_mlx import to_mlx

    reference, _ = load_reference(checkpoints / "gru")
    tokens = torch.tensor([[1, 2, 3, 4]])
    expected = reference(tokens)
    to_mlx(checkpoints / "gru", tmp_path / "f16", dtype="float16")
    to_mlx(checkpoints / "gru", tmp_path / "q8", dtype="float32", quantize=True, q_bits=8, q_group_size=32)
    from_float16, raw = load_reference(tmp_path / "f16")
    assert "quantization" not in raw
    torch.testing.assert_close(from_float16(tokens), expected, atol=2e-3, rtol=0)
    dequantized, raw = load_reference(tmp_path / "q8")
    assert raw["quantization"]["bits"] == 8
    diff = (dequantized(tokens) - expected).abs().max()
    assert 0 < diff < 0.05  # 8-bit weights: close to the float model, not equal


# ----------------------------------------------------------------------------
# macOS: Core ML itself


@pytest.mark.skipif(
    sys.platform != "darwin" or int(platform.mac_ver()[0].split(".")[0] or 0) < 15,
    reason="Core ML predictions need macOS 15 or later (coremltools converts on Linux but cannot predict)",
)
def test_coreml_greedy_tokens_match_mlx(packages, checkpoints):
    import mlx.core as mx

    import pararnn_mlx

    paths, _ = packages
    model, _ = pararnn_mlx.load(checkpoints / "gru", mode="sequential")
    prompt = [10, 200, 33]
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)
    expected = []
    for _ in range(50):
        token = int(mx.argmax(logits[0, -1]).item())
        expected.append(token)
        logits = model(mx.array([[token]]), cache=cache)

    prefill = ct.models.MLModel(str(paths["gru"]), function_name="prefill")
    decode = ct.models.MLModel(str(paths["gru"]), function_name="decode")
    prefill_state, state = prefill.make_state(), decode.make_state()
    out = prefill.predict({"input_ids": np.array([prompt], dtype=np.int32)}, state=prefill_state)
    config, _ = load_reference(checkpoints / "gru")
    for spec in state_specs(config.config):  # each function's MLModel has its own state: hand it over
        state.write_state(spec.name, prefill_state.read_state(spec.name))
    got = []
    for _ in range(50):
        token = int(np.argmax(out["logits"][0]))
        got.append(token)
        out = decode.predict({"input_ids": np.array([[token]], dtype=np.int32)}, state=state)
    assert got == expected
