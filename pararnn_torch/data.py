"""Training data: documents from text files, folders, JSONL or the embedded corpus, packed into sequences.

Documents are tokenized, each followed by the end-of-text token, and concatenated
into one token stream cut into sequences of ``seq_len + 1`` tokens. ``resets``
marks the first token of every document so the model never carries state across
a document boundary. The order of sequences is a seeded permutation per epoch,
so the batch of any step is a pure function of (seed, step): resuming needs only
the step number.
"""

from __future__ import annotations

import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pararnn_core.tokenizer import TextTokenizer

#: stdlib folders left out of the embedded corpus (tests are huge and repetitive)
_SKIPPED_STDLIB = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__"}
EMBEDDED_CORPUS = "the Python standard library's own sources (found next to the running interpreter)"


class DataError(ValueError):
    pass


def embedded_documents(max_bytes: int, seed: int = 0) -> list[str]:
    """Modules of the running interpreter's standard library, a seeded sample up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & _SKIPPED_STDLIB))
    if not files:
        raise DataError(f"no Python sources found under {root}; pass --data with your own text")
    random.Random(seed).shuffle(files)
    docs, used = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        docs.append(text)
        used += len(text.encode("utf-8"))
        if used >= max_bytes:
            break
    return docs


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number} is not valid JSON ({e})") from None
            text = item.get("text") if isinstance(item, dict) else item
            if not isinstance(text, str):
                raise DataError(f'{path}:{number}: expected a string or an object with a "text" string')
            docs.append(text)
    return docs


def read_documents(path) -> list[str]:
    """A .jsonl file (one document per line: a string or {"text": ...}), a text file (one
    document), or a folder (every UTF-8 file below it, one document each, sorted by path)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist (omit --data to train on the embedded corpus)")
    if path.is_file():
        if path.suffix == ".jsonl":
            docs = _jsonl_documents(path)
        else:
            try:
                docs = [path.read_text(encoding="utf-8")]
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text") from None
    else:
        docs = []
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if file.suffix == ".jsonl":
                docs.extend(_jsonl_documents(file))
                continue
            try:
                docs.append(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                continue  # binary files in a data folder are skipped, not fatal
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"no text found in {path}")
    return docs


def pack(docs: list[str], tokenizer: TextTokenizer) -> tuple[np.ndarray, np.ndarray]:
    """One token stream (each document + end-of-text) and its document-start mask."""
    eos = tokenizer.eos_token_id
    pieces, starts = [], []
    for doc in docs:
        ids = tokenizer.encode(doc) + ([eos] if eos is not None else [])
        start = np.zeros(len(ids), dtype=bool)
        start[0] = True
        pieces.append(np.asarray(ids, dtype=np.int64))
        starts.append(start)
    return np.concatenate(pieces), np.concatenate(starts)


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long
    resets: torch.Tensor  # [B, T] bool


class PackedSequences:
    """Fixed-length windows of a token stream; ``batch(step, ...)`` is deterministic."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.starts, self.seq_len, self.seed = tokens, starts, seq_len, seed
        self.count = (len(tokens) - 1) // seq_len
        self._orders: dict[int, np.ndarray] = {}
        if self.count < 1:
            raise DataError(
                f"the data has {len(tokens)} tokens, fewer than one sequence of --seq-len {seq_len} + 1; "
                f"use more data or a shorter --seq-len"
            )

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.count)}
        return self._orders[epoch]

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        begin = index * self.seq_len
        window = self.tokens[begin : begin + self.seq_len + 1]
        return window, self.starts[begin : begin + self.seq_len]

    def _collate(self, indices) -> Batch:
        windows, starts = zip(*(self.sequence(int(i)) for i in indices))
        tokens = torch.from_numpy(np.stack(windows))
        return Batch(tokens[:, :-1], tokens[:, 1:], torch.from_numpy(np.stack(starts)))

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        """This process's share of the global batch of ``step`` (``batch_size`` sequences in all)."""
        first = step * batch_size
        indices = []
        for k in range(first, first + batch_size):
            epoch, offset = divmod(k, self.count)
            indices.append(self._order(epoch)[offset])
        share = batch_size // world
        return self._collate(indices[rank * share : (rank + 1) * share])

    def eval_batches(self, batch_size: int, limit: int) -> list[Batch]:
        """The first sequences in stream order, for a loss that is comparable across evaluations."""
        n = min(self.count, batch_size * limit)
        return [self._collate(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def split_documents(docs: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last documents for evaluation (the end of the text when there is only one)."""
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - eval_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    held = min(len(docs) - 1, max(1, round(len(docs) * eval_fraction)))
    return docs[:-held], docs[-held:]
