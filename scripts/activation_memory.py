"""Peak CPU memory of one training step with and without --activation-checkpointing, at a fixed size.

    .venv/bin/python scripts/activation_memory.py --json act_memory.json

Each setting runs in a fresh process (peak RSS is per process, and memory freed by one
step is not given back to the system, so one process cannot measure both). Reported:
the peak resident set size during one forward + backward minus the resident size just
before it (weights and data allocated, and a short step already run so that one-time
costs such as thread pools and lazily loaded kernels are not counted): the activations
kept for backward plus the gradients, which are the same in both settings.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

SIZE = ("d_model", "layers", "heads", "seq_len", "batch_size", "mode")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args) -> dict:
    import torch

    from pararnn_core.lm_config import LMConfig
    from pararnn_torch import distributed as scale
    from pararnn_torch.lm import ParaRNNLM
    from pararnn_torch.train import lm_loss

    torch.manual_seed(0)
    config = LMConfig(vocab_size=258, d_model=args.d_model, n_layers=args.layers, num_heads=args.heads)
    model = ParaRNNLM(config, mode=args.mode)
    if args.checkpointing:
        scale.checkpoint_blocks(model)
    tokens = torch.randint(0, 258, (args.batch_size, args.seq_len + 1))
    lm_loss(model(tokens[:1, :16]), tokens[:1, 1:17], 0.0).backward()
    model.zero_grad(set_to_none=True)
    before = _rss_bytes()
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], 0.0)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"loss": loss.item(), "step_peak_bytes": peak - before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mode", default="auto")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # the child's setting
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    size = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SIZE]
    plain, ckpt = (
        json.loads(subprocess.run([sys.executable, __file__, "--child", *size, *flag], check=True,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1])
        for flag in ([], ["--checkpointing"])
    )
    report = {
        "size": {k: getattr(args, k) for k in SIZE},
        "without_mib": plain["step_peak_bytes"] / 2**20,
        "with_mib": ckpt["step_peak_bytes"] / 2**20,
        "saved_fraction": 1 - ckpt["step_peak_bytes"] / plain["step_peak_bytes"],
        "same_loss": plain["loss"] == ckpt["loss"],
    }
    print(f"one step at {report['size']}: peak RSS during forward+backward {report['without_mib']:.0f} MiB without, "
          f"{report['with_mib']:.0f} MiB with activation checkpointing ({100 * report['saved_fraction']:.0f}% less); "
          f"same loss: {report['same_loss']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
