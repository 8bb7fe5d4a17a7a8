"""Training at scale for pararnn-train: FSDP2 sharding, activation checkpointing, sharded checkpoints.

``--fsdp`` shards every block (and the root: embedding, final norm, head) with PyTorch's
FSDP2 ``fully_shard``; compute runs in bf16 with fp32 gradient reductions when the run is
bf16 (``--dtype auto`` on CUDA), in fp32 otherwise (CPU/gloo: fp32 keeps one process and
many bit-comparable, and bf16 CPU matmuls are slow).

An FSDP run folder is the usual checkpoint folder plus ``fsdp_checkpoint/``: a
torch.distributed.checkpoint (DCP) directory with the sharded weights and optimizer
state, the training state of pararnn_torch.checkpointing (``training_state.json`` +
``.safetensors``: schedule, step, history, flags, data cursors; the optimizer is in the
shards) and one ``rank-NNNNN.safetensors`` per process (its RNG state). Nothing is
pickled by us; DCP's own format stores the shards, and loading them unpickles nothing
but DCP's metadata. ``config.json``, the tokenizer and ``model.safetensors`` (what
``pararnn-convert to-mlx`` and ``load_lm`` read) are exported from the shards at the
end of every run, or on demand with ``pararnn-train --export --out DIR``.

Crash safety (pararnn_core.safe_folder): rank 0 holds the lock of ``--out`` for the whole
run. Every save, all processes write into one staging folder next to ``fsdp_checkpoint/``
(``staging_path`` named by rank 0's pid); when every process is done, rank 0 alone
commits it with one atomic exchange (``commit``), so ``fsdp_checkpoint/`` is always a
complete checkpoint; leftovers of a killed save are removed (``recover``) at the next start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pararnn_core import checkpoint, safe_folder
from pararnn_core.cli_args import CLIError, positive_float, positive_int
from pararnn_core.lm_config import LMConfig
from pararnn_core.presets import PRESETS
from pararnn_core.tokenizer import TextTokenizer
from pararnn_torch import checkpointing
from pararnn_torch.lm import ParaRNNLM, save_lm

SHARDED_DIR = "fsdp_checkpoint"
SHARDED_STATE = checkpointing.STATE_JSON
#: files an export writes itself (everything else in the folder is carried over)
_EXPORT_WRITES = {checkpoint.CONFIG_FILE, checkpoint.WEIGHTS_FILE, checkpoint.INDEX_FILE}


def add_arguments(parser):
    g = parser.add_argument_group("scale (README: Training at scale)")
    g.add_argument("--preset", choices=tuple(PRESETS),
                   help="model and schedule at one of the paper's scales (flags given override it)")
    g.add_argument("--dry-run", action="store_true",
                   help="print parameters, tokens per step and per-GPU memory for DDP and FSDP; allocate nothing")
    g.add_argument("--world-size", type=positive_int, default=8, help="processes (GPUs) the --dry-run estimate is for")
    g.add_argument("--gpu-memory-gib", type=positive_float, default=None, help="--dry-run: say whether it fits in this")
    g.add_argument("--fsdp", action="store_true", help="shard weights, grads and optimizer state (FSDP2) per block")
    # None: not given (train_flags: a fresh run's default is off, --resume keeps the run's setting)
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each block in the backward pass instead of keeping its activations")
    g.add_argument("--export", action="store_true",
                   help="write model.safetensors of the FSDP run in --out from its sharded checkpoint, then exit")
    g.add_argument("--streaming", action="store_true", default=None,
                   help="--data is a folder or glob of .jsonl/text shards read as training goes, split by process; "
                        "the last shard is held out for evaluation")
    g.add_argument("--peak-tflops", type=positive_float, default=None,
                   help="peak TFLOP/s of one device for MFU (default: bf16 table for A100/H100/H200)")


# ----------------------------------------------------------------------------
# the model


def checkpoint_blocks(model: ParaRNNLM):
    """Activation checkpointing per block: only the block's input is kept; the backward pass runs the
    block's forward again. The instance's forward is replaced, so parameter names do not change."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def shard(model: ParaRNNLM, bf16: bool):
    """FSDP2 per block, then the root. bf16: bf16 weights in compute, fp32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # a block returns its cell state as a view of the output sequence; nothing updates it in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


# ----------------------------------------------------------------------------
# the run folder


def _config_dict(config: LMConfig) -> dict:
    return {**config.to_dict(), "torch_dtype": "float32"}


def write_run_folder(out: Path, config: LMConfig, tokenizer: TextTokenizer, force: bool, rank: int):
    """config.json and the tokenizer, before any weights exist (rank 0, crash-safely, under its lock on
    ``out``). Every process calls this: none may still be checking that ``out`` is free when rank 0 creates it."""
    dist.barrier()
    if rank == 0:
        checkpoint.check_writable(out, force)
        with safe_folder.staging(out, replace=force) as tmp:
            (tmp / checkpoint.CONFIG_FILE).write_text(
                json.dumps(_config_dict(config), indent=2, sort_keys=True) + "\n")
            for name, content in tokenizer.files().items():
                (tmp / name).write_bytes(content)
    dist.barrier()


def has_sharded_state(out: Path) -> bool:
    return checkpointing.has_run(Path(out) / SHARDED_DIR)


def recover_sharded(out: Path):
    """Remove (or put back) what a killed sharded save left; call with the lock of ``out`` held."""
    for note in safe_folder.recover(Path(out) / SHARDED_DIR):
        print(f"note: {note}", file=sys.stderr)


def load_run_model(out: Path, mode: str, device, trust_remote_code: bool) -> tuple[ParaRNNLM, TextTokenizer]:
    """The model (fresh weights; the shards are loaded after sharding) and tokenizer of an FSDP run folder."""
    config = LMConfig.load(out, trust_remote_code=trust_remote_code)
    return ParaRNNLM(config, mode=mode, device=device), TextTokenizer.from_folder(out)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def _rng_tensors(rng: dict) -> dict:
    return {name: value for name, value in rng.items() if value is not None}


def _collective_device():
    # NCCL moves CUDA tensors only
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def _writer_pid() -> int:
    """Rank 0's pid, known to every process: it names the staging folder that rank 0 commits."""
    pid = torch.tensor([os.getpid()], dtype=torch.int64, device=_collective_device())
    dist.broadcast(pid, src=0)
    return int(pid)


def save_sharded(model, optimizer, out: Path, state: checkpointing.TrainingState, rank: int):
    """Every process writes its shards and RNG state into one staging folder; when all are done rank 0
    commits it in place of ``fsdp_checkpoint/`` (one atomic exchange). ``state`` is rank 0's (its
    ``optimizer`` is left empty: the optimizer state is in the shards)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = Path(out) / SHARDED_DIR
    stage = safe_folder.staging_path(target, _writer_pid())
    model_state, optim_state = get_state_dict(model, optimizer)
    if rank == 0:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        safe_folder.fault_point("staging-created")
    dist.barrier()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(stage))
    save_file(_rng_tensors(state.rng), str(stage / _rank_file(rank)))
    if rank == 0:
        safe_folder.fault_point("staging-partial")
        for name, content in checkpointing.state_files(state).items():
            content(stage / name) if callable(content) else (stage / name).write_bytes(content)
        safe_folder.fault_point("staging-written")
    dist.barrier()
    if rank == 0:
        safe_folder.commit(stage, target, replace=True)
    dist.barrier()


def load_sharded(model, optimizer, out: Path, rank: int) -> dict | None:
    """Load weights and optimizer state into the sharded model (any world size: DCP reshards); returns
    this rank's saved RNG state (None for a rank the run did not have: it takes rank 0's)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(out) / SHARDED_DIR
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    own = folder / _rank_file(rank)
    return load_file(str(own)) if own.is_file() else None


# ----------------------------------------------------------------------------
# export: sharded checkpoint -> model.safetensors in the same folder


def _carry_over(out: Path, written: set) -> dict:
    """The folder's other files and folders, hard-linked into the new folder (no copy of the shards)."""
    files = {}
    for entry in sorted(out.iterdir()):
        if entry.name in written or entry.name.startswith(".") or checkpoint.WEIGHTS_FILE in entry.name:
            continue
        if entry.is_dir():
            files[entry.name] = lambda dst, src=entry: shutil.copytree(src, dst, copy_function=os.link)
        else:
            files[entry.name] = lambda dst, src=entry: os.link(src, dst)
    return files


def export_full_state(out: Path, config: LMConfig, tokenizer: TextTokenizer, full_state: dict, files: dict):
    """Write ``full_state`` (name -> full CPU tensor) as the folder's weights, keeping the folder's other contents."""
    model = ParaRNNLM(config, device="meta")
    model.load_state_dict(full_state, assign=True)
    written = _EXPORT_WRITES | set(tokenizer.files()) | set(files)
    return save_lm(model, out, tokenizer, files={**_carry_over(out, written), **files}, force=True)


def gather_full_state(model) -> dict:
    """Every process takes part; rank 0 gets the full fp32 weights on the CPU, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export(out: Path, trust_remote_code: bool = False):
    """``pararnn-train --export``: one process reads the shards of ``out`` and writes its model.safetensors
    (under the folder's lock: no training run may swap the shards meanwhile)."""
    import torch.distributed.checkpoint as dcp

    with safe_folder.FolderLock(out, "pararnn-train --export"):
        recover_sharded(out)
        if not has_sharded_state(out):
            raise CLIError(f"--export needs an FSDP run folder; {out / SHARDED_DIR / SHARDED_STATE} not found")
        config = LMConfig.load(out, trust_remote_code=trust_remote_code)
        tokenizer = TextTokenizer.from_folder(out)
        state = {"model": ParaRNNLM(config).state_dict()}
        dcp.load(state, checkpoint_id=str(out / SHARDED_DIR), no_dist=True)
        return export_full_state(out, config, tokenizer, state["model"], {})


def init_single_process_group(device_type: str):
    """FSDP needs a process group even for one process (no torchrun): an in-memory one of size 1."""
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def save_run(model, optimizer, out: Path, state: checkpointing.TrainingState, rank: int, config: LMConfig,
             tokenizer: TextTokenizer, export_weights: bool):
    """The FSDP save of pararnn-train: shards and training state; then either the full weights exported into
    the folder (with the metrics and loss curve) or, between exports, only those two files rewritten."""
    save_sharded(model, optimizer, out, state, rank)
    files = checkpointing.report_files(state.history)
    if export_weights:
        full_state = gather_full_state(model)
        if rank == 0:
            export_full_state(out, config, tokenizer, full_state, files)
    elif rank == 0:
        for name, content in files.items():
            tmp = out / f".tmp-{os.getpid()}-{name}"  # keeps the suffix (matplotlib picks the format by it)
            content(tmp) if callable(content) else tmp.write_bytes(content)
            if tmp.exists():  # a writer may skip its file (no matplotlib)
                os.replace(tmp, out / name)
    dist.barrier()


# ----------------------------------------------------------------------------
# presets and the dry run


def _vocab_size(args) -> int:
    from pararnn_core.presets import PRESET_VOCAB_SIZE

    if args.tokenizer:
        return TextTokenizer.from_file(args.tokenizer).vocab_size
    return PRESET_VOCAB_SIZE if args.preset else TextTokenizer.bytes().vocab_size


def apply_preset(parser, args, argv):
    """Parse again with the preset's values as defaults (flags given on the command line still win). The
    preset's values then count as given flags (train_flags: a --resume with another model is refused)."""
    from pararnn_core import presets
    from pararnn_torch.train_flags import DEFAULTS

    cell = args.cell or DEFAULTS["cell"]
    parser.set_defaults(**presets.training_defaults(args.preset, cell, _vocab_size(args)))
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = presets.warmup_steps(args.steps)
    return args


def dry_run(args, config_from_args) -> str:
    """The ``--dry-run`` report: sizes from the config alone, nothing allocated."""
    from pararnn_core.presets import PAPER_PARAMETERS
    from pararnn_core.sizing import dry_run_report

    config = config_from_args(args, _vocab_size(args), None)
    report = dry_run_report(config, args.world_size, args.batch_size, args.seq_len, args.activation_checkpointing,
                            args.gpu_memory_gib, PAPER_PARAMETERS.get(args.preset))
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    schedule = (f"schedule: {args.steps:,} steps ({args.steps * args.batch_size * args.seq_len / 1e9:,.1f}B tokens), "
                f"lr {args.lr:g}, warm-up {warmup:,} steps, cosine to {args.min_lr_ratio:g} x lr, weight decay "
                f"{args.weight_decay:g}, z-loss {args.z_loss:g}, grad clip {args.grad_clip:g}")
    return report + "\n" + schedule


# ----------------------------------------------------------------------------
# streaming data


def streaming_sets(args, tokenizer: TextTokenizer, rank: int, world: int):
    """Training stream over all shards but the last (sorted by path); the last one's start is the eval set."""
    from pararnn_torch import data as data_mod

    if not args.data:
        raise CLIError("--streaming needs --data (a folder or glob of .jsonl/text shards)")
    paths = data_mod.shard_paths(args.data)
    if len(paths) < 2:
        raise data_mod.DataError(f"--streaming needs at least 2 shards (the last is held out for evaluation), "
                                 f"found {len(paths)} in {args.data}")
    train_set = data_mod.StreamingShards(paths[:-1], tokenizer, args.seq_len, args.seed, rank, world)
    # enough characters for the eval batches at >= 1 token per 4 characters (bytes: 1 per character)
    need = 4 * (args.eval_batches * args.batch_size * args.seq_len + 1)
    eval_docs = data_mod.read_first_documents(paths[-1:], need)
    eval_set = data_mod.PackedSequences(*data_mod.pack(eval_docs, tokenizer), args.seq_len, args.seed,
                                        split=f"evaluation shard {paths[-1].name}")
    return train_set, eval_set


def gather_stream_state(stream, world: int) -> list[list[int]]:
    """Every process's cursor (all processes call this), as a list per rank for the run state."""
    if world == 1:
        return [stream.state()]
    mine = torch.tensor(stream.state(), dtype=torch.int64, device=_collective_device())
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


def load_stream_state(stream, saved, rank: int, world: int):
    if not saved:
        raise CLIError("--streaming --resume, but the saved run has no stream cursors; the run folder is "
                       "inconsistent")
    if len(saved) != world:
        raise CLIError(f"the streaming run was saved with {len(saved)} processes; resume it with "
                       f"{len(saved)} (each process continues in its own shards), not {world}")
    stream.load_state(saved[rank])
