"""The compiled radix ranking (retrieval.index._ranking) against numpy's stable argsort."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index._ranking import COUNTS_SHAPE, key_bits, order_key, rank_descending, sort_keys


def _sorted_by_ours(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = keys.astype(np.uint64).copy()
    ids = np.arange(k.shape[0], dtype=np.int64)
    k2, ids2 = np.empty_like(k), np.empty_like(ids)
    counts = np.empty(COUNTS_SHAPE, np.int64)
    if sort_keys(k, ids, k2, ids2, counts):
        return k2, ids2
    return k, ids


def _keys(rng: np.random.Generator, case: str, n: int) -> np.ndarray:
    if case == "random":
        return rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(
            0, 2, n, dtype=np.uint64
        )
    if case == "long_runs":
        # three values of the top bits, random low 31 bits: runs of ~n/3 keys equal in every
        # sorted bit (bits 40-63), ordered by the fix-up merge sort below bit 40
        top = rng.integers(0, 3, n).astype(np.uint64) << np.uint64(62)
        return top | rng.integers(0, 2**31, n).astype(np.uint64)
    if case == "short_runs":
        # near ties: runs of 2-20 keys equal above bit 20, ordered by insertion
        top = rng.integers(0, max(1, n // 8), n).astype(np.uint64) << np.uint64(40)
        return top | rng.integers(0, 2**20, n).astype(np.uint64)
    if case == "ties":
        return rng.integers(0, 5, n).astype(np.uint64) << np.uint64(50)
    if case == "equal":
        return np.full(n, 12345, np.uint64)
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["random", "long_runs", "short_runs", "ties", "equal"])
@pytest.mark.parametrize("n", [0, 1, 2, 33, 5000])
def test_sort_keys_is_a_stable_sort(case: str, n: int) -> None:
    keys = _keys(np.random.default_rng(n), case, n)
    got_k, got_i = _sorted_by_ours(keys)
    want = np.argsort(keys, kind="stable")
    np.testing.assert_array_equal(got_i, want)
    np.testing.assert_array_equal(got_k, keys[want])


def test_long_runs_take_the_fix_up_sort() -> None:
    """The long-run case really has runs of over 32 keys equal in the radix-sorted bits."""
    keys = _keys(np.random.default_rng(0), "long_runs", 5000)
    _, counts = np.unique(keys >> np.uint64(40), return_counts=True)
    assert counts.max() > 32


def test_rank_descending_equals_stable_argsort() -> None:
    rng = np.random.default_rng(3)
    s = rng.standard_normal((4, 3000))
    s[0, :1000] = 0.0  # ties at zero, -0.0 among them
    s[0, 1000:1100] = -0.0
    s[1] = np.round(s[1], 1)  # many exact ties
    s[2] = 1.0 + rng.integers(0, 2**20, 3000) * 2.0**-52  # near ties in the last bits
    s[3, ::2] = -1.0
    out = np.empty(s.shape, np.int64)
    rank_descending(np.ascontiguousarray(s + 0.0).view(np.uint64), out)
    np.testing.assert_array_equal(out, np.argsort(-s, axis=1, kind="stable"))


def test_key_bits_inverts_order_key() -> None:
    rng = np.random.default_rng(5)
    s = np.r_[rng.standard_normal(200), 0.0, -0.0, 1.0, -1.0, 1e-300, -1e-300]
    bits = s.view(np.uint64)
    keys = np.array([order_key(b) for b in bits], np.uint64)
    back = np.array([key_bits(k) for k in keys], np.uint64).view(np.float64)
    np.testing.assert_array_equal(back[s != 0], s[s != 0])
    assert back[s == 0].tobytes() == np.zeros(2).tobytes()  # -0.0 comes back as 0.0
    # ascending keys are descending scores
    np.testing.assert_array_equal(
        np.argsort(keys, kind="stable"), np.argsort(-(s + 0.0), kind="stable")
    )


@pytest.mark.parametrize("n_parts", [1, 3, 17])
def test_merge_topk_equals_lexsort_of_the_concatenation(n_parts: int) -> None:
    """Ranked parts (ties, 0.0 / -0.0 and empty parts included), one part returned as it is:
    the order of a lexsort of everything by (score descending, id ascending), for every k."""
    from retrieval.index.sharded import merge_topk

    rng = np.random.default_rng(n_parts)
    sizes = rng.integers(0, 40, n_parts)
    sizes[0] = max(sizes[0], 1)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    ids, scs = [], []
    for start, n in zip(starts, sizes, strict=True):
        s = rng.integers(-2, 3, (5, n)).astype(np.float64) / 2  # many ties, 0.0 and -0.0
        s[s == 0] = rng.choice([0.0, -0.0], int((s == 0).sum()))
        order = np.lexsort((np.arange(n)[None].repeat(5, 0), -s), axis=-1)
        ids.append(order + start)
        scs.append(np.take_along_axis(s, order, 1))
    all_ids, all_sc = np.concatenate(ids, axis=1), np.concatenate(scs, axis=1)
    want = np.lexsort((all_ids, -all_sc), axis=-1)
    for k in (1, 7, None):
        got_i, got_s = merge_topk(ids, scs, k)
        kk = all_ids.shape[1] if k is None else k
        np.testing.assert_array_equal(got_i, np.take_along_axis(all_ids, want, 1)[:, :kk])
        np.testing.assert_array_equal(got_s, np.take_along_axis(all_sc, want, 1)[:, :kk])
