"""Data generators of the four synthetic tasks (ParaRNN paper, arXiv 2510.21450, Tables 1 and 6).

Every generator returns ``(inputs, targets)``: int64 arrays [n, L] of tokens and of
labels, with ``IGNORE`` where a position carries no label. The model reads the tokens
causally and predicts a label at every position; accuracy counts labelled positions.
Generation is a pure function of the seed (numpy PCG64 through a SeedSequence).

* parity (|V| = 2): the label at t is the XOR of tokens 1..t (running parity, every
  position labelled).
* MQAR (kappa key-value pairs, |V| tokens): the sequence opens with kappa distinct keys,
  each followed by its value; every later position is a query, one of the kappa keys
  drawn at random, labelled with that key's value (multi-query associative recall).
* k-hop induction (|V| tokens): find(t) is the position right after the latest earlier
  occurrence of token x_t; the label at t is the token at find^k(t) (k-fold induction
  head, Sanford et al. 2024); positions where a hop has no earlier occurrence carry none.
* keep-nth (|V| tokens): every n-th token (positions n, 2n, ... counting from 1) is
  kept; the label at t is the latest kept token at or before t; the first n-1
  positions carry none. Solving it means counting positions modulo n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: label of positions that are not scored (the torch cross-entropy default)
IGNORE = -100

TASKS = ("parity", "mqar", "khop", "keepnth")
_SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class TaskSettings:
    """What a generator needs: the task, its sequence length, vocabulary and its own parameter.

    ``param`` is kappa (key-value pairs) for MQAR, k (hops) for k-hop, n for keep-nth;
    parity has none (0).
    """

    task: str
    seq_len: int
    vocab_size: int
    param: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.task == "parity" and self.vocab_size != 2:
            raise ValueError(f"parity reads bits: vocab_size must be 2, got {self.vocab_size}")
        if self.task == "mqar":
            if self.param < 1 or 2 * self.param >= self.seq_len:
                raise ValueError(f"mqar needs 1 <= kappa < seq_len/2, got kappa={self.param}, seq_len={self.seq_len}")
            if self.vocab_size < 2 * self.param:
                raise ValueError(f"mqar needs vocab_size >= 2*kappa, got {self.vocab_size} for kappa={self.param}")
        if self.task in ("khop", "keepnth") and self.param < 1:
            raise ValueError(f"{self.task} needs a positive k or n, got {self.param}")
        if self.task == "keepnth" and self.param >= self.seq_len:
            raise ValueError(f"keepnth needs n < seq_len, got n={self.param}, seq_len={self.seq_len}")

    @property
    def num_classes(self) -> int:
        """Labels range over the vocabulary in every task (parity: the two bit values)."""
        return self.vocab_size


def rng_for(seed: int, split: str, settings: TaskSettings) -> np.random.Generator:
    """One independent stream per (seed, split, task): train and test never share samples by construction."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    entropy = [int(seed), _SPLITS[split], TASKS.index(settings.task)]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def generate(settings: TaskSettings, num_samples: int, seed: int, split: str = "train"):
    """``num_samples`` sequences of the task: (inputs, targets), int64 arrays [num_samples, seq_len]."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    rng = rng_for(seed, split, settings)
    make = {"parity": _parity, "mqar": _mqar, "khop": _khop, "keepnth": _keepnth}[settings.task]
    inputs, targets = make(rng, settings, num_samples)
    return inputs.astype(np.int64), targets.astype(np.int64)


def _parity(rng, s: TaskSettings, n: int):
    bits = rng.integers(0, 2, size=(n, s.seq_len))
    return bits, np.bitwise_xor.accumulate(bits, axis=1)


def _mqar(rng, s: TaskSettings, n: int):
    kappa, length = s.param, s.seq_len
    # distinct keys and distinct values per sequence, from disjoint halves of the vocabulary
    half = s.vocab_size // 2
    keys = rng.permuted(np.tile(np.arange(half), (n, 1)), axis=1)[:, :kappa]
    values = half + rng.permuted(np.tile(np.arange(s.vocab_size - half), (n, 1)), axis=1)[:, :kappa]
    inputs = np.empty((n, length), dtype=np.int64)
    targets = np.full((n, length), IGNORE, dtype=np.int64)
    inputs[:, 0:2 * kappa:2] = keys
    inputs[:, 1:2 * kappa:2] = values
    which = rng.integers(0, kappa, size=(n, length - 2 * kappa))
    rows = np.arange(n)[:, None]
    inputs[:, 2 * kappa:] = keys[rows, which]
    targets[:, 2 * kappa:] = values[rows, which]
    return inputs, targets


def _khop(rng, s: TaskSettings, n: int):
    tokens = rng.integers(0, s.vocab_size, size=(n, s.seq_len))
    # after[b, t]: position right after the latest occurrence of tokens[b, t] strictly before t, or -1
    after = np.full((n, s.seq_len), -1, dtype=np.int64)
    last_seen = np.full((n, s.vocab_size), -1, dtype=np.int64)
    rows = np.arange(n)
    for t in range(s.seq_len):
        prev = last_seen[rows, tokens[:, t]]
        after[:, t] = np.where(prev >= 0, prev + 1, -1)
        last_seen[rows, tokens[:, t]] = t
    position = np.tile(np.arange(s.seq_len), (n, 1))
    for _ in range(s.param):
        valid = position >= 0
        position = np.where(valid, after[rows[:, None], np.maximum(position, 0)], -1)
    targets = np.where(position >= 0, tokens[rows[:, None], np.maximum(position, 0)], IGNORE)
    return tokens, targets


def _keepnth(rng, s: TaskSettings, n: int):
    tokens = rng.integers(0, s.vocab_size, size=(n, s.seq_len))
    every = s.param
    t = np.arange(s.seq_len)
    # 1-based positions n, 2n, ... are 0-based n-1, 2n-1, ...; the latest at or before t
    kept = ((t + 1) // every) * every - 1
    targets = np.where(kept >= 0, tokens[:, np.maximum(kept, 0)], IGNORE)
    return tokens, targets
