"""Train one model on one task with one seed; score it on held-out sequences."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pararnn_torch.tasks.data import IGNORE, generate
from pararnn_torch.tasks.models import TaskModel
from pararnn_torch.tasks.presets import RunSettings

#: a run "reached" its final accuracy at the first evaluation within this of it
REACHED_TOLERANCE = 0.01


@dataclass
class TaskData:
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor


def make_data(settings: RunSettings) -> TaskData:
    """Train and test sets of the run, from ``settings.data_seed`` (shared by every model and seed)."""
    task = settings.task_settings
    train = generate(task, settings.train_samples, settings.data_seed, "train")
    test = generate(task, settings.test_samples, settings.data_seed, "test")
    return TaskData(*(torch.from_numpy(a) for a in (*train, *test)))


def build_model(model: str, settings: RunSettings) -> TaskModel:
    task = settings.task_settings
    return TaskModel(model, task.vocab_size, task.num_classes, settings.seq_len, settings.d_model,
                     settings.state_size, settings.num_heads, settings.mixer_only, settings.mode,
                     settings.layers)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model: TaskModel, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 250) -> dict:
    """Accuracy over labelled positions, and the fraction of sequences with every labelled position right."""
    model.eval()
    correct = labelled = perfect = 0
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        hit = model(x).argmax(-1) == y
        scored = y != IGNORE
        correct += int((hit & scored).sum())
        labelled += int(scored.sum())
        perfect += int((hit | ~scored).all(1).sum())
    model.train()
    return {"accuracy": correct / max(labelled, 1), "sequence_accuracy": perfect / len(inputs)}


def train_run(model_name: str, settings: RunSettings, seed: int, data: TaskData, on_eval=None) -> dict:
    """Train ``model_name`` with ``seed`` (initialisation and batch order); returns the result record.

    ``on_eval(step, accuracy)`` is called after every evaluation (progress display).
    """
    torch.manual_seed(seed)
    model = build_model(model_name, settings)
    lr = settings.lr_for(model_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, settings.warmup_steps, settings.steps))
    order = np.random.default_rng(seed)
    eval_inputs = data.test_inputs[: settings.eval_samples]
    eval_targets = data.test_targets[: settings.eval_samples]

    history = []
    batches = np.empty(0, dtype=np.int64)
    started, cpu_started = time.perf_counter(), time.process_time()
    step = 0
    while step < settings.steps:
        if len(batches) < settings.batch_size:
            batches = np.concatenate([batches, order.permutation(len(data.train_inputs))])
        index, batches = torch.from_numpy(batches[: settings.batch_size]), batches[settings.batch_size:]
        loss = loss_fn(model(data.train_inputs[index]), data.train_targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        step += 1
        if step % settings.eval_every == 0 or step == settings.steps:
            accuracy = evaluate(model, eval_inputs, eval_targets)["accuracy"]
            history.append({"step": step, "accuracy": accuracy, "train_loss": loss.item()})
            if on_eval is not None:
                on_eval(step, accuracy)
            if accuracy >= settings.stop_at:
                break
    train_seconds = time.perf_counter() - started
    final = evaluate(model, data.test_inputs, data.test_targets)
    reached = next((h["step"] for h in history if h["accuracy"] >= final["accuracy"] - REACHED_TOLERANCE), step)
    return {
        "test_accuracy": final["accuracy"],
        "test_sequence_accuracy": final["sequence_accuracy"],
        "steps_to_accuracy": reached,
        "steps_trained": step,
        "parameters": model.num_parameters(),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        # CPU time of the run's process: what the run costs on an idle core, whatever the machine's load
        "cpu_seconds": time.process_time() - cpu_started,
        "lr": lr,
        "mixer_mode": getattr(model.mixer, "last_solve", None) and model.mixer.last_solve.mode,
        "history": history,
    }
