"""ART / mART generators: layout, answers, disjoint splits, determinism, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sweep.config import TaskConfig
from sweep.errors import UserError
from sweep.tasks import make_splits


def small(name: str, **kw) -> TaskConfig:
    return TaskConfig(name=name, **({"train_size": 5000, "val_size": 1000, "test_size": 1000} | kw))


def answer_by_reading(text: str, pairs: int, name: str) -> str:
    """The answer as a person finds it in the decoded string."""
    keys, values = (text[0 : 2 * pairs : 2], text[1 : 2 * pairs : 2]) if name == "art" else (
        text[:pairs], text[pairs : 2 * pairs])
    return values[keys.index(text[-1])]


@pytest.mark.parametrize("name", ["art", "mart"])
def test_layout_and_answers(name: str) -> None:
    k = 4
    s = make_splits(small(name, pairs=k))
    assert (s.vocab_size, s.num_classes, s.seq_len) == (37, 10, 2 * k + 3)
    for split in (s.train, s.val, s.test):
        assert split.x.dtype == torch.int64 and split.y.dtype == torch.int64
        assert split.x.shape[1] == 2 * k + 3 and int(split.x.max()) < 37 and int(split.y.max()) < 10
    for row, y in zip(s.train.x[:300], s.train.y[:300], strict=True):
        text = s.decode(row)
        assert len(text) == 2 * k + 3 and text[2 * k : 2 * k + 2] == "??"
        keys = text[0 : 2 * k : 2] if name == "art" else text[:k]
        values = text[1 : 2 * k : 2] if name == "art" else text[k : 2 * k]
        assert keys.isalpha() and values.isdigit() and len(set(keys)) == k  # distinct keys
        assert text[-1] in keys
        assert answer_by_reading(text, k, name) == s.decode_answer(y) == str(int(y))


def test_query_and_values_are_spread() -> None:
    s = make_splits(small("art", pairs=4, train_size=20000))
    text = [s.decode(r) for r in s.train.x[:4000]]
    positions = np.bincount([t[0:8:2].index(t[-1]) for t in text], minlength=4) / len(text)
    assert np.all(np.abs(positions - 0.25) < 0.03)  # query uniform over the K keys
    assert np.all(np.abs(np.bincount(s.train.y.numpy(), minlength=10) / 20000 - 0.1) < 0.01)
    assert any(len(set(t[1:8:2])) < 4 for t in text)  # values repeat


@pytest.mark.parametrize("name", ["art", "mart"])
def test_splits_share_no_sequence(name: str) -> None:
    # Few distinct sequences (5*4*3 * 3^3 * 3 = 4860), so overlaps would be common without dedupe.
    s = make_splits(TaskConfig(name=name, pairs=3, num_keys=5, num_values=3, train_size=2000, val_size=300,
                               test_size=300, seed=3))
    rows = [{tuple(r) for r in split.x.tolist()} for split in (s.train, s.val, s.test)]
    assert len(s.val) == 300 and len(s.test) == 300
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]


def test_too_few_distinct_sequences_is_a_user_error() -> None:
    with pytest.raises(UserError, match="task.val_size"):
        make_splits(TaskConfig(pairs=1, num_keys=2, num_values=2, train_size=50, val_size=10, test_size=10))


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = (make_splits(small("art", seed=s)) for s in (7, 7, 8))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)
    assert not torch.equal(a.train.x, c.train.x)


def test_fixed_seed_gives_known_data() -> None:
    """Pins the stream: a change here changes every published result (PCG64 is machine-independent)."""
    art, mart = make_splits(small("art", seed=0)), make_splits(small("mart", seed=0))
    assert [art.decode(split.x[0]) for split in (art.train, art.val, art.test)] == [
        "l1d9u2n5??n", "z3h5v2p8??h", "s1x6t3w4??t"]
    assert mart.decode(mart.train.x[0]) == "ldun1925??n"  # the same draws, laid out keys-then-values


def test_large_alphabets_decode_with_separators() -> None:
    s = make_splits(TaskConfig(pairs=16, num_keys=500, num_values=50, train_size=1000, val_size=100,
                               test_size=100))
    tokens = s.decode(s.train.x[0]).split(" ")
    assert len(tokens) == 35 and tokens[32:34] == ["?", "?"] and tokens[0].startswith("k")
    keys = [int(tokens[i][1:]) for i in range(0, 32, 2)]
    assert len(set(keys)) == 16
    assert s.decode_answer(s.train.y[0]) == tokens[2 * keys.index(int(tokens[-1][1:])) + 1]


@pytest.mark.parametrize("name", ["art", "mart"])
def test_100k_sequences_are_fast(name: str) -> None:
    from sweep.tasks import _cached_splits

    make_splits(small(name, train_size=10))  # warm-up (imports)
    _cached_splits.cache_clear()  # time the generation, not the process's cache
    start = time.perf_counter()
    s = make_splits(TaskConfig(name=name, pairs=8, train_size=100_000, val_size=10_000, test_size=20_000))
    assert time.perf_counter() - start < 3.0  # ~0.15 s on one core
    assert len(s.train) == 100_000


def test_a_process_generates_a_task_once_and_training_leaves_it_unchanged(tiny_trial, tmp_path) -> None:
    """Tune runs trial after trial of a sweep in one worker: the splits are generated once per task config
    (a reused actor starts its next trial without the 0.2-3 s of generation), and a trial only reads them."""
    from sweep.reporter import NullReporter
    from sweep.tasks.retrieval import make_art_splits
    from sweep.train import run_trial

    trial = tiny_trial()
    first = make_splits(trial.task)
    assert make_splits(trial.task.model_copy()) is first  # an equal config: the same splits
    assert make_splits(trial.task.model_copy(update={"seed": 2})) is not first
    run_trial(trial, NullReporter(), tmp_path)
    fresh = make_art_splits(trial.task)
    for name in ("train", "val", "test"):
        kept, new = getattr(make_splits(trial.task), name), getattr(fresh, name)
        assert torch.equal(kept.x, new.x) and torch.equal(kept.y, new.y), name
