"""Folders that mlx-lm writes from a ParaRNN conversion (mlx_lm.convert with a mixed per-layer recipe and with
the mxfp4 mode) load in pararnn_mlx.load and pararnn-generate with the same greedy tokens as mlx-lm's own
loader; the checkpoint check reads per-layer quantization; loading reads only the validated weight files."""

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx_lm.convert import convert as mlx_lm_convert  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import load as mlx_lm_load  # noqa: E402

from pararnn_convert.cli import main as convert_main  # noqa: E402
from pararnn_core import checkpoint  # noqa: E402
from pararnn_mlx.generate import main as generate_main  # noqa: E402
from pararnn_mlx.loader import load  # noqa: E402
from tests.lm_helpers import tiny_checkpoint  # noqa: E402

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    tiny_checkpoint(root / "torch", d_model=64, num_heads=1, mlp_size=128)
    assert convert_main(["to-mlx", "--model", str(root / "torch"), "--out", str(root / "float"), "--dtype",
                         "float32"]) == 0
    return root / "float"


def _greedy(model, tokenizer, n=16):
    return [int(t) for t, _ in generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=n)]


@pytest.mark.parametrize("recipe", [dict(quant_predicate="mixed_4_6"), dict(q_mode="mxfp4")],
                         ids=["mixed_4_6", "mxfp4"])
def test_mlx_lm_quantized_folder_loads_and_generates_like_mlx_lm(float_folder, tmp_path, capsys, recipe):
    out = tmp_path / "q"
    mlx_lm_convert(str(float_folder), str(out), quantize=True, trust_remote_code=True, **recipe)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    ours, tokenizer = load(out)
    theirs, _ = mlx_lm_load(str(out), trust_remote_code=True)
    down = ours.layers[-1].mlp.down_proj
    if "quant_predicate" in recipe:  # per-layer entries: the last layer's down_proj gets 6 bits, others 4
        assert quantization["layers.1.mlp.down_proj"]["bits"] == 6 and down.bits == 6
        assert ours.layers[0].mlp.up_proj.bits == 4
    else:
        assert down.mode == "mxfp4" and down.scales.dtype == mx.uint8
    tokens = mx.array([list(PROMPT.encode())])
    np.testing.assert_array_equal(np.array(ours(tokens)), np.array(theirs(tokens)))
    expected = _greedy(theirs, tokenizer)
    assert _greedy(ours, tokenizer) == expected
    capsys.readouterr()
    assert generate_main(["--model", str(out), "--prompt", PROMPT, "--max-tokens", "16", "--verbose", "false"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tokenizer.decode(expected)


def test_check_reports_a_per_layer_entry_that_disagrees_with_the_stored_tensors(float_folder, tmp_path):
    out = tmp_path / "q"
    mlx_lm_convert(str(float_folder), str(out), quantize=True, trust_remote_code=True, quant_predicate="mixed_4_6")
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["layers.0.mlp.up_proj"] = {"group_size": 64, "bits": 8, "mode": "affine"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.CheckpointError, match=r"layers\.0\.mlp\.up_proj\.weight: shape \[128, 8\], "
                                                         r"expected \[128, 16\]"):
        load(out)


def test_expected_table_infers_every_mlx_mode_from_stored_scales():
    shapes = {"embed.weight": (256, 64)}
    for mode, (group, bits) in checkpoint.QUANT_MODE_DEFAULTS.items():
        scales = "F16" if mode == "affine" else "U8"
        found = {"embed.weight": ("U32", (256, 64 * bits // 32)), "embed.scales": (scales, (256, 64 // group))}
        table = checkpoint.expected_table(shapes, {"group_size": 64, "bits": 4, "mode": "affine"}, found)
        assert table["embed.weight"] == ("U32", (256, 64 * bits // 32))
        assert table["embed.scales"] == (None if mode == "affine" else "U8", (256, 64 // group))
        assert ("embed.biases" in table) == (mode == "affine")
    found = {"embed.weight": ("U32", (256, 16)), "embed.scales": ("U8", (256, 1))}  # 8 bits, group 64: no mode
    with pytest.raises(checkpoint.CheckpointError, match="match no mlx quantization mode"):
        checkpoint.expected_table(shapes, {"group_size": 64, "bits": 4}, found)


def test_stray_weight_file_changes_nothing(float_folder, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(float_folder, folder)
    model, _ = load(folder)
    tokens = mx.array([list(PROMPT.encode())])
    before = np.array(model(tokens))
    weights = mx.load(str(folder / "model.safetensors"))
    mx.save_safetensors(str(folder / "model_v2.safetensors"), {k: mx.zeros_like(v) for k, v in weights.items()})
    model, _ = load(folder)
    np.testing.assert_array_equal(np.array(model(tokens)), before)
