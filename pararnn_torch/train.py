"""``pararnn-train``: train a ParaRNN language model with PyTorch (one process, or many through torchrun).

    pararnn-train --out runs/tiny --steps 300                 # embedded corpus, CPU or GPU
    torchrun --nproc-per-node 8 -m pararnn_torch.train --data corpus.jsonl --out runs/big ...

The output folder is a checkpoint folder (config.json, model.safetensors,
tokenizer files) plus the training state (``training_state.json`` +
``training_state.safetensors``: optimizer, schedule, step, RNG; no pickle),
``metrics.jsonl`` and ``loss_curve.png`` (pararnn_torch.checkpointing). It is
replaced crash-safely every ``--save-every`` steps, under an exclusive lock on
the folder (pararnn_core.safe_folder); ``--resume`` continues from it exactly,
refusing changed model/data flags (pararnn_torch.train_flags).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pararnn_core.checkpoint import CheckpointError, check_separate, check_writable
from pararnn_core.cli_args import (
    CLIError,
    Parser,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)
from pararnn_core.lm_config import LMConfig
from pararnn_core.safe_folder import FolderLock, missing_hint
from pararnn_core.tokenizer import TextTokenizer
from pararnn_torch import data as data_mod
from pararnn_torch.checkpointing import (
    STATE_JSON,
    History,
    TrainingState,
    capture_rng,
    has_run,
    load_run,
    restore_rng,
    save_run,
)
from pararnn_torch.lm import ParaRNNLM, load_lm
from pararnn_torch.train_flags import DEFAULTS, resolve_fresh, resolve_resume


def build_parser() -> argparse.ArgumentParser:
    # flags of train_flags.FIXED_ON_RESUME / CHANGEABLE_ON_RESUME default to None ("not given"):
    # a fresh run takes train_flags.DEFAULTS, --resume the run's saved values
    d = DEFAULTS
    p = Parser(prog="pararnn-train", description="Train a ParaRNN language model (PyTorch).")
    g = p.add_argument_group("data (fixed for a run)")
    g.add_argument("--data", help="text file, folder of text files, or .jsonl (default: the embedded corpus)")
    g.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (default: byte-level, 256 bytes + specials)")
    g.add_argument("--corpus-bytes", type=positive_int,
                   help=f"size of the embedded corpus sample (default {d['corpus_bytes']:,})")
    g.add_argument("--eval-fraction", type=fraction,
                   help=f"documents held out for evaluation (default {d['eval_fraction']})")
    g.add_argument("--seq-len", type=positive_int, help=f"tokens per sequence (default {d['seq_len']})")
    g.add_argument("--batch-size", type=positive_int,
                   help=f"sequences per step, over all processes (default {d['batch_size']})")
    g.add_argument("--seed", type=non_negative_int, help=f"seed of the init and the data order (default {d['seed']})")
    g = p.add_argument_group("model (fixed for a run)")
    g.add_argument("--cell", help=f"gru, lstm, mgu or a registered user cell (default {d['cell']})")
    g.add_argument("--cell-module", help="module to import that registers a user cell (runs its code)")
    g.add_argument("--d-model", type=positive_int, help=f"(default {d['d_model']})")
    g.add_argument("--layers", type=positive_int, help=f"(default {d['layers']})")
    g.add_argument("--heads", type=positive_int, help=f"(default {d['heads']})")
    g.add_argument("--cell-size", type=non_negative_int, help="cell hidden size (default: d-model)")
    g.add_argument("--mlp-size", type=non_negative_int, help="SwiGLU hidden size (default: 8/3 d-model)")
    g.add_argument("--untied", action="store_true", default=None,
                   help="separate output head instead of tied embeddings")
    g = p.add_argument_group("optimisation (may change on --resume)")
    g.add_argument("--steps", type=positive_int,
                   help=f"total steps (default {d['steps']}; on --resume: >= the saved step)")
    g.add_argument("--lr", type=positive_float, help=f"peak learning rate (default {d['lr']})")
    g.add_argument("--min-lr-ratio", type=non_negative_float,
                   help=f"cosine schedule floor, as a fraction of --lr (default {d['min_lr_ratio']})")
    g.add_argument("--warmup", type=non_negative_int, help="warm-up steps (default: 5%% of --steps)")
    g.add_argument("--weight-decay", type=non_negative_float, help=f"(default {d['weight_decay']})")
    g.add_argument("--grad-clip", type=non_negative_float,
                   help=f"gradient norm clip, 0: off (default {d['grad_clip']})")
    g.add_argument("--z-loss", type=non_negative_float,
                   help="weight of the z-loss (logsumexp^2), e.g. 1e-4 (default 0)")
    g.add_argument("--mode", help="solver mode of the cells (auto, parallel, sequential, ...; default auto)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype (auto, the default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--eval-every", type=positive_int, help=f"(default {d['eval_every']})")
    g.add_argument("--eval-batches", type=positive_int, help=f"(default {d['eval_batches']})")
    g.add_argument("--save-every", type=positive_int, help=f"(default {d['save_every']})")
    g = p.add_argument_group("run (this invocation only)")
    g.add_argument("--out", required=True, help="output checkpoint folder (locked while the run writes it)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out (flags not given keep the run's values)")
    g.add_argument("--force", action="store_true", help="start over, replacing --out")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="on --resume, allow importing the user cell's module named in config.json (runs its code)")
    g.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop after this many steps in this run (time-sliced jobs); --resume continues")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
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
        try:
            return torch.device(name)
        except RuntimeError:
            raise CLIError(f"--device {name!r} is not a torch device; expected e.g. cpu, cuda, cuda:1") from None
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
        trust_remote_code=True,  # a --cell-module given on the command line is the user's own choice
    )


def _check_args(args, world):
    if args.batch_size % world:
        raise CLIError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.min_lr_ratio > 1:
        raise CLIError(f"--min-lr-ratio must be in [0, 1] (a fraction of --lr), got {args.min_lr_ratio}")


def _resolve_flags(args, out: Path) -> TrainingState | None:
    """Check --out and fill the flags not given; returns the saved state when resuming."""
    if args.resume and args.force:
        raise CLIError("--resume continues the run in --out and --force replaces it: pass one of them")
    if args.resume:
        if not has_run(out):
            raise CLIError(f"--resume, but {out} holds no saved run ({STATE_JSON} not found){missing_hint(out)}")
        state = load_run(out)
        for note in resolve_resume(args, state.args, state.step, out):
            print(f"note: resuming with {note}", file=sys.stderr)
    else:
        state = None
        resolve_fresh(args)
    check_separate(out, {"--data": args.data})
    if state is None:
        try:
            check_writable(out, args.force)
        except FileExistsError as e:
            raise CLIError(f"{e} (or --resume to continue the run in it)") from None
    return state


def _apply_schedule_flags(optimizer, scheduler, args):
    """After loading a saved optimizer/scheduler: the (possibly changed) --lr, schedule and
    --weight-decay take effect from the saved step on; unchanged flags give the saved values."""
    scheduler.base_lrs = [args.lr for _ in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    optimizer.param_groups[0]["weight_decay"] = args.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def train(args) -> dict:
    device = _pick_device(args.device)
    ddp = Dist.from_env(device.type)
    if device.type == "cuda" and ddp.world > 1:
        device = torch.device("cuda", ddp.local_rank)
        torch.cuda.set_device(device)
    out = Path(args.out)
    # rank 0 writes --out: it holds the folder's lock for the whole run (and recovers what killed runs left)
    with FolderLock(out, "pararnn-train") if ddp.main else contextlib.nullcontext():
        if ddp.world > 1:
            dist.barrier()
        return _train(args, out, device, ddp)


def _train(args, out: Path, device, ddp: Dist) -> dict:
    saved = _resolve_flags(args, out)
    _check_args(args, ddp.world)

    if saved is not None:
        model, tokenizer = load_lm(out, mode=args.mode, device=device, dtype=torch.float32,
                                   trust_remote_code=args.trust_remote_code)
        config = model.config
        if _config_from_args(args, tokenizer.vocab_size, tokenizer.eos_token_id) != config:
            raise CheckpointError(
                f"{out}: {STATE_JSON} and config.json describe different models; the run folder is inconsistent"
            )
    else:
        tokenizer = TextTokenizer.from_file(args.tokenizer) if args.tokenizer else TextTokenizer.bytes()
        config = _config_from_args(args, tokenizer.vocab_size, tokenizer.eos_token_id)
        torch.manual_seed(args.seed)
        model = ParaRNNLM(config, mode=args.mode, device=device)
    # data (deterministic, identical in every process)
    docs = data_mod.read_documents(args.data) if args.data else data_mod.embedded_documents(args.corpus_bytes)
    train_docs, eval_docs = data_mod.split_documents(docs, args.eval_fraction)
    train_set = data_mod.PackedSequences(*data_mod.pack(train_docs, tokenizer), args.seq_len, args.seed,
                                         split="training split")
    eval_set = data_mod.PackedSequences(*data_mod.pack(eval_docs, tokenizer), args.seq_len, args.seed,
                                        split=f"evaluation split (--eval-fraction {args.eval_fraction})")
    eval_batches = eval_set.eval_batches(args.batch_size, args.eval_batches)  # rank 0 evaluates them all

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "cell." not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "cell." not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps, args.min_lr_ratio))
    history, step = History(), 0
    if saved is not None:
        optimizer.load_state_dict(saved.optimizer)
        scheduler.load_state_dict(saved.scheduler)
        _apply_schedule_flags(optimizer, scheduler, args)
        step, history = saved.step, saved.history
        restore_rng(saved.rng, device)

    wrapped = model
    if ddp.world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    use_bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    replace = saved is not None or args.force  # the first save of a fresh run never replaces a folder

    def save():
        nonlocal replace
        if not ddp.main:
            return
        state = TrainingState(
            step=step, args=vars(args), history=history, optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(), rng=capture_rng(device),
            data_position={"step": step, "sequences": step * args.batch_size},
        )
        save_run(out, model, tokenizer, state, force=replace)
        replace = True

    tokens_per_step = args.batch_size * args.seq_len
    last = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    if ddp.main:
        n_params = sum(p.numel() for p in model.parameters())
        source = args.data or data_mod.EMBEDDED_CORPUS
        print(
            f"pararnn-train: {config.cell} LM, {n_params / 1e6:.2f}M parameters, {config.n_layers} layers x "
            f"d_model {config.d_model}; data: {source} ({len(train_set.tokens):,} train / {len(eval_set.tokens):,} "
            f"eval tokens); {ddp.world} process(es) on {device.type}, "
            f"{'bf16 autocast' if use_bf16 else 'float32'}; steps {step} -> {last} of {args.steps}",
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
            raise CLIError(f"the loss became {value} at step {step}; lower --lr or raise --grad-clip")
        history.train.append((step, value))
        rate = (step - started_step) * tokens_per_step / (time.perf_counter() - started)
        if progress is not None:
            progress.set_postfix(loss=f"{value:.3f}", tok_s=f"{rate:,.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            progress.update(1)
        elif ddp.main and (step % 10 == 0 or step == last):
            print(f"step {step}/{args.steps} loss {value:.4f} tok/s {rate:,.0f}", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            if ddp.main:
                ev = evaluate(model, eval_batches, device, autocast)
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
    if ddp.world > 1:
        dist.destroy_process_group()
    return result


def run(argv=None) -> dict:
    """Parse the command line and train; returns the final step, losses, speed and folder."""
    args = build_parser().parse_args(argv)
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
    hint = "the last complete checkpoint in --out is intact and no partial files are left; "
    return run_cli("pararnn-train", lambda: run(argv) and 0, disk_full_hint=hint,
                   interrupt_hint="; --out holds the last complete checkpoint, --resume continues from it")


if __name__ == "__main__":
    sys.exit(main())
