"""Crafted model folders execute nothing and change nothing unless the user opts in (trust_remote_code).

The crafted folder names a ``cell_module`` whose file sits in the folder itself, which is on
``sys.path`` (as with ``python -m ... --model .``); importing it would create a marker file.
"""

import json
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pararnn_core import checkpoint
from pararnn_core.lm_config import ConfigError, LMConfig
from pararnn_torch import checkpointing
from pararnn_torch.lm import load_lm
from pararnn_torch.train import run
from tests.lm_helpers import tiny_checkpoint
from tests.test_lm_train import TINY


def plant_cell_module(folder, monkeypatch) -> tuple[str, str]:
    """Make ``folder`` name a user cell from a module file inside it; returns (cell, module)."""
    tag = uuid.uuid4().hex[:8]
    cell, module = f"planted_{tag}", f"planted_cell_{tag}"
    (folder / f"{module}.py").write_text(
        "from pathlib import Path\n"
        "Path(__file__).with_name('executed').touch()\n"
        "from pararnn_core.cells.gru import GRUCell\n\n\n"
        f"class PlantedCell(GRUCell):\n    name = {cell!r}\n"
    )
    config = json.loads((folder / checkpoint.CONFIG_FILE).read_text())
    config.update(cell=cell, cell_module=module)
    (folder / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
    monkeypatch.syspath_prepend(str(folder))
    return cell, module


def test_load_lm_imports_cell_module_only_when_trusted(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    tiny_checkpoint(folder)
    cell, module = plant_cell_module(folder, monkeypatch)
    for load in (lambda: load_lm(folder), lambda: LMConfig.load(folder),
                 lambda: LMConfig.from_dict(json.loads((folder / "config.json").read_text()))):
        with pytest.raises(ConfigError, match=rf"module '{module}'.*--trust-remote-code \(trust_remote_code=True\)"):
            load()
    assert not (folder / "executed").exists()
    model, _ = load_lm(folder, trust_remote_code=True)
    assert (folder / "executed").exists() and model.config.cell == cell


def test_resume_imports_cell_module_only_with_the_flag(tmp_path, monkeypatch):
    from tests.test_lm_train import copy_run

    source = tmp_path / "source"
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(f"def f{i}(x):\n    return x + {i}\n" * 3) + "\n" for i in range(20)))
    run(["--out", str(source), "--data", str(data), "--steps", "2", "--save-every", "2", *TINY])
    out = copy_run(source, tmp_path / "run")
    cell, module = plant_cell_module(out, monkeypatch)
    state = json.loads((out / checkpointing.STATE_JSON).read_text())
    state["args"].update(cell=cell, cell_module=module)
    (out / checkpointing.STATE_JSON).write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=rf"module '{module}'.*--trust-remote-code"):
        run(["--out", str(out), "--resume", "--steps", "3"])
    assert not (out / "executed").exists()
    assert run(["--out", str(out), "--resume", "--steps", "3", "--trust-remote-code"])["step"] == 3


def test_convert_imports_cell_module_only_with_the_flag(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlx.core")
    from pararnn_convert.cli import main

    folder = tmp_path / "ck"
    tiny_checkpoint(folder)
    _, module = plant_cell_module(folder, monkeypatch)
    assert main(["to-mlx", "--model", str(folder), "--out", str(tmp_path / "mlx")]) == 2
    err = capsys.readouterr().err
    assert module in err and "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    assert not (folder / "executed").exists() and not (tmp_path / "mlx").exists()
    assert main(["to-mlx", "--model", str(folder), "--out", str(tmp_path / "mlx"), "--trust-remote-code"]) == 0


def _plant_stray_weights(folder):
    weights = load_file(str(folder / checkpoint.WEIGHTS_FILE))
    save_file({k: torch.full_like(v, 7.0) for k, v in weights.items()}, str(folder / "model_v2.safetensors"))
    return weights


def test_a_stray_weights_file_changes_nothing_in_load_lm(tmp_path):
    folder = tmp_path / "ck"
    tiny_checkpoint(folder)
    weights = _plant_stray_weights(folder)
    model, _ = load_lm(folder)
    for name, value in weights.items():
        assert torch.equal(model.state_dict()[name], value), name


def test_a_stray_weights_file_changes_nothing_in_convert(tmp_path):
    mx = pytest.importorskip("mlx.core")
    from pararnn_convert.to_mlx import to_mlx

    folder = tmp_path / "ck"
    tiny_checkpoint(folder)
    weights = _plant_stray_weights(folder)
    to_mlx(folder, tmp_path / "mlx", dtype="float32")
    converted = mx.load(str(tmp_path / "mlx" / checkpoint.WEIGHTS_FILE))
    for name, value in weights.items():
        assert np.array_equal(np.array(converted[name]), value.numpy()), name
