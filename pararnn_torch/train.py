"""``pararnn-train``: train a ParaRNN language model with PyTorch (one process, or many through torchrun).

    pararnn-train --out runs/tiny --steps 300                 # embedded corpus, CPU or GPU
    torchrun --nproc-per-node 8 -m pararnn_torch.train --data corpus.jsonl --out runs/big ...

The output folder is a checkpoint folder (config.json, model.safetensors,
tokenizer files) plus ``training_state.pt`` (optimizer, schedule, step, RNG),
``metrics.jsonl`` and, at the end, ``loss_curve.png``. It is rewritten
atomically every ``--save-every`` steps; ``--resume`` continues from it exactly.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pararnn_core.checkpoint import check_writable
from pararnn_core.lm_config import ConfigError, LMConfig
from pararnn_core.tokenizer import TextTokenizer
from pararnn_torch import data as data_mod
from pararnn_torch import distributed as scale
from pararnn_torch.lm import ParaRNNLM, load_lm, save_lm
from pararnn_torch.throughput import ThroughputMeter, device_peak_tflops

TRAINING_STATE = "training_state.pt"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pararnn-train", description="Train a ParaRNN language model (PyTorch).")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="text file, folder of text files, or .jsonl (default: the embedded corpus)")
    g.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: byte-level, 256 bytes + specials)")
    g.add_argument("--corpus-bytes", type=int, default=4_000_000, help="size of the embedded corpus sample")
    g.add_argument("--eval-fraction", type=float, default=0.02, help="documents held out for evaluation")
    g = p.add_argument_group("model")
    g.add_argument("--cell", default="gru", help="gru, lstm, mgu or a registered user cell")
    g.add_argument("--cell-module", help="module to import that registers a user cell")
    g.add_argument("--d-model", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=1)
    g.add_argument("--cell-size", type=int, default=0, help="cell hidden size (default: d-model)")
    g.add_argument("--mlp-size", type=int, default=0, help="SwiGLU hidden size (default: 8/3 d-model)")
    g.add_argument("--untied", action="store_true", help="separate output head instead of tied embeddings")
    g.add_argument("--mode", default="auto", help="solver mode of the cells (auto, parallel, sequential, ...)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=16, help="sequences per step, over all processes")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine schedule floor, as a fraction of --lr")
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--z-loss", type=float, default=0.0, help="weight of the z-loss (logsumexp^2), e.g. 1e-4")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output checkpoint folder (required except with --dry-run)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="autocast dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    g.add_argument("--force", action="store_true", help="start over, replacing --out")
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--eval-batches", type=int, default=8)
    g.add_argument("--save-every", type=int, default=200)
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps in this run (time-sliced jobs); --resume continues")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    scale.add_arguments(p)
    return p


# ----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world


@dataclass
class History:
    train: list = field(default_factory=list)  # (step, loss)
    eval: list = field(default_factory=list)  # (step, loss)
    throughput: list = field(default_factory=list)  # (step, {"tokens_per_sec": ..., "mfu": ...})


def lr_lambda(warmup: int, steps: int, min_ratio: float):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def lm_loss(logits, targets, z_loss: float):
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, -1).pow(2).mean()
    return loss


@torch.no_grad()
def evaluate(model, batches, device, autocast) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        with autocast():
            logits = model(b.inputs.to(device), resets=b.resets.to(device))
        total += F.cross_entropy(logits.flatten(0, 1), b.targets.to(device).flatten(), reduction="sum").item()
        count += b.targets.numel()
    model.train()
    return total / count


def _pick_device(name):
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _config_from_args(args, vocab_size, eos) -> LMConfig:
    return LMConfig(
        cell=args.cell,
        cell_module=args.cell_module,
        vocab_size=vocab_size,
        d_model=args.d_model,
        n_layers=args.layers,
        num_heads=args.heads,
        cell_size=args.cell_size,
        mlp_size=args.mlp_size,
        tie_embeddings=not args.untied,
        eos_token_id=eos,
    )


def _check_args(args, world):
    for name in ("steps", "seq_len", "batch_size", "eval_every", "save_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.lr <= 0:
        raise SystemExit(f"error: --lr must be positive, got {args.lr}")


def _describe(train_set) -> str:
    tokens = getattr(train_set, "tokens", None)
    return f"{len(tokens):,}" if tokens is not None else train_set.describe()


def train(args) -> dict:
    device = _pick_device(args.device)
    ddp = Dist.from_env(device.type)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    _check_args(args, ddp.world)
    if args.fsdp and not dist.is_initialized():  # fsdp hook: one process without torchrun
        scale.init_single_process_group(device.type)
    out = Path(args.out)
    state_file = out / scale.SHARDED_DIR / scale.SHARDED_STATE if args.fsdp else out / TRAINING_STATE
    resuming = args.resume and state_file.is_file()
    if args.resume and not resuming:
        hint = "; it is an FSDP run folder: add --fsdp" if not args.fsdp and scale.has_sharded_state(out) else ""
        raise SystemExit(f"error: --resume, but {state_file} does not exist{hint}")
    if not resuming:
        try:
            check_writable(out, args.force)
        except FileExistsError as e:
            raise SystemExit(f"error: {e} (or --resume to continue the run in it)") from None

    # data (deterministic, identical in every process)
    if resuming and args.fsdp:  # fsdp hook: the weights come from the shards, below
        model, tokenizer = scale.load_run_model(out, args.mode, device)
        config = model.config
    elif resuming:
        model, tokenizer = load_lm(out, mode=args.mode, device=device, dtype=torch.float32)
        config = model.config
    else:
        tokenizer = TextTokenizer.from_file(args.tokenizer) if args.tokenizer else TextTokenizer.bytes()
        try:
            config = _config_from_args(args, tokenizer.vocab_size, tokenizer.eos_token_id)
        except ConfigError as e:
            raise SystemExit(f"error: {e}") from None
        torch.manual_seed(args.seed)
        model = ParaRNNLM(config, mode=args.mode, device=device)
        if args.fsdp:  # fsdp hook: config and tokenizer now, weights at the first export
            scale.write_run_folder(out, config, tokenizer, args.force, ddp.rank)
    try:
        if args.streaming:  # scale hook: shards read as training goes, the last one held out for evaluation
            train_set, eval_set = scale.streaming_sets(args, tokenizer, ddp.rank, ddp.world)
        else:
            docs = data_mod.read_documents(args.data) if args.data else data_mod.embedded_documents(args.corpus_bytes)
            train_docs, eval_docs = data_mod.split_documents(docs, args.eval_fraction)
            train_set = data_mod.PackedSequences(*data_mod.pack(train_docs, tokenizer), args.seq_len, args.seed)
            eval_set = data_mod.PackedSequences(*data_mod.pack(eval_docs, tokenizer), args.seq_len, args.seed)
    except data_mod.DataError as e:
        raise SystemExit(f"error: {e}") from None
    eval_batches = eval_set.eval_batches(args.batch_size, args.eval_batches)  # rank 0 evaluates them all

    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    if args.activation_checkpointing:
        scale.checkpoint_blocks(model)
    if args.fsdp:  # fsdp hook: shard before the optimizer sees the parameters
        scale.shard(model, bf16=use_bf16)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "cell." not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "cell." not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, args.steps, args.min_lr_ratio))
    history, step = History(), 0
    if resuming:
        if args.fsdp:  # fsdp hook: weights and optimizer from the shards; the rest from JSON
            state = scale.load_sharded(model, optimizer, out, ddp.rank)
        else:
            state = torch.load(out / TRAINING_STATE, map_location=device, weights_only=False)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if args.streaming:  # scale hook: each process's cursor in its shards
            scale.load_stream_state(train_set, state.get("data"), ddp.rank, ddp.world)
        history = History(**{k: [tuple(e) for e in v] for k, v in state["history"].items()})
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)

    wrapped = model
    if ddp.world > 1 and not args.fsdp:
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def run_state():
        # every process calls this: the streaming cursors of all processes are gathered here
        data_state = scale.gather_stream_state(train_set, ddp.world) if args.streaming else None
        return {
            "data": data_state,
            "scheduler": scheduler.state_dict(),
            "step": step,
            "history": history.__dict__,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "args": vars(args),
        }

    def side_files():
        speed = dict(history.throughput)
        metrics = "".join(
            json.dumps({"step": s, "train_loss": v, **speed.get(s, {})}) + "\n" for s, v in history.train
        )
        metrics += "".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in history.eval)
        return {METRICS: metrics.encode(), LOSS_CURVE: lambda path: write_loss_curve(history, path)}

    def save():
        state = run_state()
        if args.fsdp:  # fsdp hook: every process writes its shards; the full weights at the end of the run
            scale.save_run(model, optimizer, out, state, side_files(), ddp.rank, config, tokenizer,
                           export_weights=step == last)
            return
        if not ddp.main:
            return
        buf = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict(), **state}, buf)
        save_lm(model, out, tokenizer, files={TRAINING_STATE: buf.getvalue(), **side_files()}, force=True)

    tokens_per_step = args.batch_size * args.seq_len
    last = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    if ddp.main:
        n_params = sum(p.numel() for p in model.parameters())
        source = args.data or data_mod.EMBEDDED_CORPUS
        print(
            f"pararnn-train: {config.cell} LM, {n_params / 1e6:.2f}M parameters, {config.n_layers} layers x "
            f"d_model {config.d_model}; data: {source} ({_describe(train_set)} train / {len(eval_set.tokens):,} "
            f"eval tokens); {ddp.world} process(es) on {device.type}, "
            f"{'bf16' if use_bf16 else 'float32'}{', FSDP' if args.fsdp else ''}"
            f"{', activation checkpointing' if args.activation_checkpointing else ''}; "
            f"steps {step} -> {last} of {args.steps}",
            flush=True,
        )
    progress = None
    if ddp.main and not args.no_progress:
        from tqdm import tqdm

        # a log file (no terminal) gets a line every 30 s instead of a redraw per step
        progress = tqdm(total=args.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.1 if sys.stderr.isatty() else 30.0)
    model.train()
    started, started_step = time.perf_counter(), step
    meter = ThroughputMeter(config, tokens_per_step, ddp.world, device_peak_tflops(device, args.peak_tflops))
    while step < last:
        batch = train_set.batch(step, args.batch_size, ddp.rank, ddp.world)
        with autocast():
            logits = wrapped(batch.inputs.to(device), resets=batch.resets.to(device))
        loss = lm_loss(logits, batch.targets.to(device), args.z_loss)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        value = ddp.mean(loss.item())
        if not math.isfinite(value):
            raise SystemExit(f"error: the loss became {value} at step {step}; lower --lr or raise --grad-clip")
        history.train.append((step, value))
        meter.step()
        history.throughput.append((step, meter.record()))
        if progress is not None:
            progress.set_postfix(loss=f"{value:.3f}", **meter.postfix(), lr=f"{scheduler.get_last_lr()[0]:.2e}")
            progress.update(1)
        elif ddp.main and (step % 10 == 0 or step == last):
            speed = " ".join(f"{k} {v}" for k, v in meter.postfix().items())
            print(f"step {step}/{args.steps} loss {value:.4f} {speed}", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            if ddp.main or args.fsdp:  # fsdp hook: every process takes part in the sharded forward
                ev = evaluate(model, eval_batches, device, autocast)
            if ddp.main:
                history.eval.append((step, ev))
                message = f"step {step}: eval loss {ev:.4f} nats/token, perplexity {math.exp(ev):.2f}"
                (progress.write if progress is not None else print)(message)
        if step % args.save_every == 0 or step == last:
            save()
        if ddp.world > 1:
            dist.barrier()
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - started
    result = {
        "step": step,
        "train_loss": history.train[-1][1] if history.train else None,
        "eval_loss": history.eval[-1][1] if history.eval else None,
        "tokens_per_sec": (step - started_step) * tokens_per_step / elapsed if step > started_step else 0.0,
        "seconds": elapsed,
        "out": str(out),
    }
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def write_loss_curve(history: History, path: Path):
    """Train and eval loss per step as a PNG (skipped with a note when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no loss curve written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if history.train:
        ax.plot(*zip(*history.train), label="train", lw=1)
    if history.eval:
        ax.plot(*zip(*history.eval), "o-", label="eval")
    ax.axhline(math.log(256), color="gray", ls="--", lw=0.8, label="uniform bytes (ln 256)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv=None) -> dict:
    """Parse the command line and train; returns the final step, losses, speed and folder."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset:  # scale hook: the preset's values become defaults, flags given still win
        args = scale.apply_preset(parser, args, argv)
    if not args.out and not args.dry_run:
        parser.error("the following arguments are required: --out")
    if args.dry_run:
        print(scale.dry_run(args, _config_from_args))
        return {"dry_run": True}
    if args.export:
        print(scale.export(Path(args.out)).describe())
        return {"export": args.out}
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = result["eval_loss"]
        ev_text = f", eval loss {ev:.4f} (perplexity {math.exp(ev):.2f})" if ev is not None else ""
        print(
            f"done: step {result['step']}, train loss {result['train_loss']:.4f}{ev_text}, "
            f"{result['tokens_per_sec']:,.0f} tokens/s; checkpoint in {result['out']}"
        )
    return result


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
