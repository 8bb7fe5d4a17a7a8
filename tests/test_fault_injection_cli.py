"""pararnn-train and pararnn-convert --force killed at every point of a save: the folder loads, --resume continues.

One helper process (tests/fault_injection.py) imports everything once and forks a child per fault
point, so each kill costs a few tenths of a second of training instead of a fresh interpreter.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from pararnn_core import checkpoint, safe_folder
from pararnn_torch import checkpointing
from pararnn_torch.lm import load_lm
from pararnn_torch.train import run
from tests.test_checkpoint_safety import run_plan
from tests.test_lm_train import TINY

#: (fault point, kill at its n-th occurrence, no-exchange protocol, step the folder holds after the kill);
#: the 3-step run saves at steps 1 (the first save: "placed"), 2 (a replacement, which is killed) and 3
TRAIN_FAULTS = [
    ("placed", 1, False, 1),
    ("staging-created", 2, False, 1),
    ("staging-partial", 2, False, 1),
    ("staging-written", 2, False, 1),
    ("staging-synced", 2, False, 1),
    ("swapped", 1, False, 2),
    ("cleaned", 2, False, 2),
    ("marked-complete", 1, True, 1),
    ("old-moved-aside", 1, True, 2),
    ("new-in-place", 1, True, 2),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    docs = [f"def g{i}(y):\n    return y - {i}\n" * 3 for i in range(30)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


CONVERT_FAULTS = ["staging-created", "staging-partial", "staging-written", "staging-synced", "swapped", "cleaned"]


def _apple_file(path, n=8, d=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = {"cell.A": torch.randn(3, n, generator=generator), "cell.B": torch.randn(1, d, 3, n, generator=generator),
               "cell.b": torch.randn(3, n, generator=generator)}
    torch.save(tensors, path)
    return tensors


@pytest.fixture(scope="module")
def killed(tmp_path_factory, corpus):
    """Run every kill of both tests in one helper process (one interpreter start)."""
    from pararnn_convert.cli import main as convert

    root = tmp_path_factory.mktemp("faults")
    flags = ["--data", str(corpus), "--steps", "3", "--save-every", "1", *TINY, "--d-model", "16", "--seq-len", "16"]
    plan = []
    for point, nth, no_exchange, _ in TRAIN_FAULTS:
        out = root / f"train-{point}-{'renames' if no_exchange else 'exchange'}"
        plan.append({"entry": "train", "argv": ["--out", str(out), *flags], "fault": f"{point}@{nth}",
                     "no_exchange": no_exchange})
    _apple_file(root / "old.pt", seed=1)
    _apple_file(root / "new.pt", seed=2)
    for point in CONVERT_FAULTS:
        out = root / f"convert-{point}"
        assert convert(["from-apple", "--checkpoint", str(root / "old.pt"), "--out", str(out)]) == 0
        plan.append({"entry": "convert", "fault": point,
                     "argv": ["from-apple", "--checkpoint", str(root / "new.pt"), "--out", str(out), "--force"]})
    was_killed, stderr = run_plan(root, plan, timeout=300)
    assert all(was_killed), (was_killed, stderr[-3000:])
    return root, flags, plan


def test_train_killed_at_every_save_point_resumes_to_the_same_weights(killed):
    root, flags, plan = killed
    run(["--out", str(root / "straight"), *flags])
    reference = load_file(str(root / "straight" / checkpoint.WEIGHTS_FILE))
    for item, (point, _, _, step) in zip(plan, TRAIN_FAULTS):
        out = root / item["argv"][1]
        if point == "old-moved-aside":  # no exchange: the folder is back at the next start
            with pytest.raises(FileNotFoundError, match="interrupted save left"):
                load_lm(out)
        else:
            load_lm(out)
            assert checkpointing.load_run(out).step == step, point
        assert run(["--out", str(out), "--resume"])["step"] == 3, point
        weights = load_file(str(out / checkpoint.WEIGHTS_FILE))
        for name, value in reference.items():
            assert torch.equal(weights[name], value), (point, name)
        assert safe_folder.leftovers(out) == [], point


def test_convert_force_killed_at_every_save_point_leaves_a_loadable_folder(killed):
    from pararnn_convert.cli import main as convert

    root, _, _ = killed
    for point in CONVERT_FAULTS:
        out = root / f"convert-{point}"
        expected = "new.pt" if point in ("swapped", "cleaned") else "old.pt"
        assert expected in json.loads((out / checkpoint.CONFIG_FILE).read_text())["source"], point
        assert set(load_file(str(out / checkpoint.WEIGHTS_FILE))) == {"cell.weight", "cell.bias", "cell.recurrent"}
        assert convert(["from-apple", "--checkpoint", str(root / "new.pt"), "--out", str(out), "--force"]) == 0
        assert safe_folder.leftovers(out) == []
