"""The associative retrieval tasks: ART (Ba et al. 2016) and mART (Keller et al. 2018).

ART:  k1 v1 k2 v2 ... kK vK ? ? q  -> the value stored with key q     ("c9k8j3f1??c" -> 9)
mART: k1 k2 ... kK v1 v2 ... vK ? ? q -> the same answer               ("ckjf9831??c" -> 9)

Keys are distinct within a sequence; values repeat freely; the query is one of the K keys, uniformly.
Token ids: keys 0..num_keys-1, values num_keys..num_keys+num_values-1, then '?'. Targets are value
indices 0..num_values-1. Everything comes from numpy's PCG64 generator seeded with `task.seed`, fully
vectorised, so the same seed gives the same data on every machine, fast enough to make at trial start.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import perm
from typing import Any

import numpy as np
import torch

from sweep.config import TaskConfig
from sweep.errors import Problem, UserError

# Bounds the memory of the key shuffle (rows x num_keys random numbers at a time).
_SHUFFLE_CHUNK = 4_000_000
# Rounds of extra draws to fill validation/test with sequences unseen in earlier splits.
_MAX_FILL_ROUNDS = 20


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # [N, T] int64 token ids
    y: torch.Tensor  # [N] int64 answers in 0..num_values-1

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Splits:
    """Train/validation/test sets of one task, with no sequence shared between them."""

    task: TaskConfig
    train: Split
    val: Split
    test: Split
    vocab_size: int
    num_classes: int
    seq_len: int
    symbols: tuple[str, ...] = field(repr=False)  # token id -> printable symbol

    def decode(self, x_row: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """A sequence as people write it: 'c9k8j3f1??c' (tokens space-separated if any is longer)."""
        tokens = [self.symbols[int(t)] for t in _as_list(x_row)]
        return ("" if all(len(t) == 1 for t in tokens) else " ").join(tokens)

    def decode_answer(self, y: int | torch.Tensor) -> str:
        return self.symbols[self.task.num_keys + int(y)]


def make_art_splits(cfg: TaskConfig) -> Splits:
    return _make_splits(cfg, interleaved=True)


def make_mart_splits(cfg: TaskConfig) -> Splits:
    return _make_splits(cfg, interleaved=False)


# ------------------------------------------------------------------------------------------ internals


def _symbols(num_keys: int, num_values: int) -> tuple[str, ...]:
    keys = list(string.ascii_lowercase[:num_keys]) if num_keys <= 26 else [f"k{i}" for i in range(num_keys)]
    values = [str(i) for i in range(num_values)] if num_values <= 10 else [f"v{i}" for i in range(num_values)]
    return (*keys, *values, "?")


Arrays = tuple[np.ndarray, np.ndarray]


def _draw(rng: np.random.Generator, n: int, cfg: TaskConfig, interleaved: bool) -> Arrays:
    """n sequences [n, 2K+3] (uint16 token ids) and their answers [n] (value indices)."""
    k, nk, nv = cfg.pairs, cfg.num_keys, cfg.num_values
    keys = _distinct_keys(rng, n, k, nk)
    values = rng.integers(0, nv, size=(n, k))
    which = rng.integers(0, k, size=n)
    rows = np.arange(n)

    x = np.empty((n, 2 * k + 3), dtype=np.uint16)
    if interleaved:
        x[:, 0 : 2 * k : 2] = keys
        x[:, 1 : 2 * k : 2] = nk + values
    else:
        x[:, :k] = keys
        x[:, k : 2 * k] = nk + values
    x[:, 2 * k : 2 * k + 2] = nk + nv  # '?', '?'
    x[:, 2 * k + 2] = keys[rows, which]
    return x, values[rows, which]


def _distinct_keys(rng: np.random.Generator, n: int, k: int, nk: int) -> np.ndarray:
    """[n, k] keys, distinct within each row, uniform over ordered k-tuples of the nk-letter alphabet."""
    if nk > 64 and k * k <= nk:
        # Large alphabet, few pairs: draw with replacement and redraw the (rare) rows with a repeat.
        keys = rng.integers(0, nk, size=(n, k))
        while True:
            srt = np.sort(keys, axis=1)
            bad = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
            if bad.size == 0:
                return keys
            keys[bad] = rng.integers(0, nk, size=(bad.size, k))
    # Otherwise: the first k of a random permutation per row (argsort of noise), in bounded chunks.
    rows_per_chunk = max(1, _SHUFFLE_CHUNK // nk)
    chunks = [
        rng.random((min(rows_per_chunk, n - i), nk)).argsort(axis=1)[:, :k]
        for i in range(0, n, rows_per_chunk)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, k), dtype=np.int64)


def _row_ids(x: np.ndarray) -> np.ndarray:
    """One opaque, exact value per row (its bytes), so whole sequences can be compared with np.isin."""
    return np.ascontiguousarray(x).view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()


def _fill_unseen(rng: np.random.Generator, cfg: TaskConfig, interleaved: bool, size: int,
                 first: Arrays, seen: np.ndarray, name: str) -> Arrays:
    """`size` sequences none of which is in `seen`, starting from a first draw and topping it up."""
    xs, ys = [], []
    x, y = first
    have = 0
    for _ in range(_MAX_FILL_ROUNDS):
        keep = ~np.isin(_row_ids(x), seen)
        xs.append(x[keep])
        ys.append(y[keep])
        have += int(keep.sum())
        if have >= size:
            return np.concatenate(xs)[:size], np.concatenate(ys)[:size]
        extra = max(64, 2 * (size - have))
        x, y = _draw(rng, extra, cfg, interleaved)
    raise UserError(Problem(
        f"task.{name}_size",
        f"cannot find {size} {name} sequences unseen in the earlier splits: "
        f"{cfg.name} with pairs={cfg.pairs}, num_keys={cfg.num_keys}, num_values={cfg.num_values} has only "
        f"{_distinct_sequences(cfg):,} distinct sequences",
        "raise pairs, num_keys or num_values, or lower the split sizes",
    ))


def _distinct_sequences(cfg: TaskConfig) -> int:
    return perm(cfg.num_keys, cfg.pairs) * cfg.num_values**cfg.pairs * cfg.pairs


def _make_splits(cfg: TaskConfig, interleaved: bool) -> Splits:
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    n_train, n_val, n_test = cfg.train_size, cfg.val_size, cfg.test_size
    x, y = _draw(rng, n_train + n_val + n_test, cfg, interleaved)

    # Train keeps its natural duplicates; validation, then test, drop anything an earlier split holds.
    train = x[:n_train], y[:n_train]
    seen = np.unique(_row_ids(train[0]))
    val_first = x[n_train : n_train + n_val], y[n_train : n_train + n_val]
    val = _fill_unseen(rng, cfg, interleaved, n_val, val_first, seen, "val")
    seen = np.union1d(seen, _row_ids(val[0]))
    test_first = x[n_train + n_val :], y[n_train + n_val :]
    test = _fill_unseen(rng, cfg, interleaved, n_test, test_first, seen, "test")

    def split(xy: Arrays) -> Split:
        return Split(torch.from_numpy(xy[0].astype(np.int64)), torch.from_numpy(xy[1].astype(np.int64)))

    return Splits(
        task=cfg,
        train=split(train),
        val=split(val),
        test=split(test),
        vocab_size=cfg.num_keys + cfg.num_values + 1,
        num_classes=cfg.num_values,
        seq_len=2 * cfg.pairs + 3,
        symbols=_symbols(cfg.num_keys, cfg.num_values),
    )


def _as_list(row: Any) -> list[int]:
    if isinstance(row, torch.Tensor):
        return row.tolist()
    if isinstance(row, np.ndarray):
        return row.tolist()
    return list(row)
