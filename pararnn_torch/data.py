"""Training data: documents from text files, folders, JSONL or the embedded corpus, packed into sequences.

Documents are tokenized, each followed by the end-of-text token, and concatenated
into one token stream cut into sequences of ``seq_len + 1`` tokens. ``resets``
marks the first token of every document so the model never carries state across
a document boundary. The order of sequences is a seeded permutation per epoch,
so the batch of any step is a pure function of (seed, step): resuming needs only
the step number.
"""

from __future__ import annotations

import glob as globmod
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
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{number} is not UTF-8 text (byte {e.start + 1} of the line); a .jsonl file is UTF-8 JSON"
                ) from None
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

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, seq_len: int, seed: int, split: str = "data"):
        """``split`` names this part of the data in errors (e.g. "training split")."""
        self.tokens, self.starts, self.seq_len, self.seed = tokens, starts, seq_len, seed
        self.count = (len(tokens) - 1) // seq_len
        self._orders: dict[int, np.ndarray] = {}
        if self.count < 1:
            raise DataError(
                f"the {split} has {len(tokens)} tokens, fewer than one sequence of --seq-len {seq_len} + 1; "
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


# ----------------------------------------------------------------------------
# streaming from many shards (--streaming): nothing is loaded beyond the documents of the current window


def shard_paths(spec) -> list[Path]:
    """The shards of ``--data`` with --streaming: every file below a folder (sorted), or the files a glob matches."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in globmod.glob(str(spec), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(
            f"--data {spec} names no files; give a folder of .jsonl/text shards or a glob like 'dir/*.jsonl'"
        )
    return files


def _parse_jsonl_line(path: Path, offset: int, line: bytes) -> str:
    try:
        item = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} at byte {offset} is not valid JSON ({e})") from None
    text = item.get("text") if isinstance(item, dict) else item
    if not isinstance(text, str):
        raise DataError(f'{path} at byte {offset}: expected a string or an object with a "text" string')
    return text


def _shard_documents(path: Path, offset: int):
    """(byte offset, text) of each document of a shard from ``offset`` on: a .jsonl line each, else the whole file."""
    if path.suffix != ".jsonl":
        if offset == 0:
            try:
                yield 0, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                return  # binary files among the shards are skipped, as in read_documents
        return
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            start = f.tell()
            line = f.readline()
            if not line:
                return
            if line.strip():
                yield start, _parse_jsonl_line(path, start, line)


@dataclass
class _Segment:
    """Tokens of one document (+ end-of-text), from ``begin`` on still unread."""

    epoch: int
    shard: int  # position in the epoch's shard order
    offset: int  # byte offset of the document in its shard
    tokens: np.ndarray
    begin: int = 0


class StreamingShards:
    """Windows of ``seq_len + 1`` tokens packed on the fly from this process's shards.

    Process ``rank`` reads shards ``rank, rank + world, ...`` (sorted by path), in a seeded
    order per epoch; documents are packed as in ``PackedSequences`` (each followed by the
    end-of-text token; consecutive windows share one token). Memory holds only the
    documents of the current window. ``state()`` is the cursor of the next window (epoch,
    shard, byte offset of its document, token inside it, step): a resume seeks there
    and continues exactly. Batches must be asked for in step order.
    """

    def __init__(self, paths, tokenizer: TextTokenizer, seq_len: int, seed: int, rank: int = 0, world: int = 1):
        paths = list(paths)
        if len(paths) < world:
            raise DataError(
                f"--streaming reads whole shards per process: {len(paths)} shard(s) for {world} processes; "
                f"split the data into at least {world} files"
            )
        self.paths, self.tokenizer, self.seq_len, self.seed = paths[rank::world], tokenizer, seq_len, seed
        self.rank, self.step = rank, 0
        self._restart(0, 0, 0, 0)

    def describe(self) -> str:
        return f"streaming {len(self.paths)} shard(s) per process"

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.paths))

    def _documents(self, epoch: int, shard: int, offset: int):
        while True:
            order = self._order(epoch)
            found = False
            for position in range(shard, len(order)):
                for start, text in _shard_documents(self.paths[order[position]], offset):
                    if text:
                        found = True
                        yield epoch, position, start, text
                offset = 0
            if not found and shard == 0:
                raise DataError(f"no text found in the shards {', '.join(map(str, self.paths))}")
            epoch, shard = epoch + 1, 0

    def _restart(self, epoch: int, shard: int, offset: int, token: int):
        self._reader = self._documents(epoch, shard, offset)
        self._segments: list[_Segment] = []
        self._pull()
        self._segments[0].begin = token

    def _pull(self):
        epoch, shard, offset, text = next(self._reader)
        eos = self.tokenizer.eos_token_id
        ids = np.asarray(self.tokenizer.encode(text) + ([eos] if eos is not None else []), dtype=np.int64)
        self._segments.append(_Segment(epoch, shard, offset, ids))

    def _next_window(self) -> tuple[np.ndarray, np.ndarray]:
        need = self.seq_len + 1
        while sum(len(s.tokens) - s.begin for s in self._segments) < need:
            self._pull()
        tokens, starts, taken = [], [], 0
        for s in self._segments:
            piece = s.tokens[s.begin : s.begin + need - taken]
            start = np.zeros(len(piece), dtype=bool)
            start[0] = s.begin == 0
            tokens.append(piece)
            starts.append(start)
            taken += len(piece)
            if taken == need:
                break
        # advance by seq_len: the window's last token is the next window's first
        advance = self.seq_len
        while advance:
            s = self._segments[0]
            used = min(advance, len(s.tokens) - s.begin)
            s.begin += used
            advance -= used
            if s.begin == len(s.tokens):
                self._segments.pop(0)
        if not self._segments:
            self._pull()
        return np.concatenate(tokens), np.concatenate(starts)[: self.seq_len]

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        if step != self.step:
            raise RuntimeError(f"streaming data is read in order: batch of step {step} asked for at step {self.step}")
        windows, starts = zip(*(self._next_window() for _ in range(batch_size // world)))
        self.step += 1
        tokens = torch.from_numpy(np.stack(windows))
        return Batch(tokens[:, :-1], tokens[:, 1:], torch.from_numpy(np.stack(starts)))

    def state(self) -> list[int]:
        s = self._segments[0]
        return [s.epoch, s.shard, s.offset, s.begin, self.step]

    def load_state(self, state: list[int]):
        epoch, shard, offset, token, step = (int(v) for v in state)
        self._restart(epoch, shard, offset, token)
        self.step = step


def read_first_documents(paths, min_chars: int) -> list[str]:
    """Documents from the start of ``paths`` until ``min_chars`` characters (the held-out eval shard)."""
    docs, used = [], 0
    for path in paths:
        for _, text in _shard_documents(path, 0):
            if text:
                docs.append(text)
                used += len(text)
            if used >= min_chars:
                return docs
    return docs
