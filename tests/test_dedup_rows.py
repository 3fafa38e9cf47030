"""The rows dedup's pair batches read (:class:`imgstore.dedup.HeldRows`): what the loader gives,
transformed row-wise, read once while they fit the budget."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from imgstore.dedup import HeldRows, _pair_dots, _pair_similarity, _unit, signature_similarity


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.sets(st.integers(0, 60), min_size=1), min_size=1, max_size=6),
       budget_rows=st.integers(1, 80), seed=st.integers(0, 2**32 - 1))
def test_rows_are_the_loaders_and_read_once_within_the_budget(batches: list[set[int]], budget_rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    stored = {i: rng.standard_normal(5).astype(np.float32) for i in range(0, 61) if rng.random() < 0.8}
    asked: list[int] = []

    def load(ids: list[int]) -> dict[int, np.ndarray]:
        asked.extend(ids)
        return {i: stored[i] for i in ids if i in stored}

    held = HeldRows(load, _unit, budget=budget_rows * 5 * 4)
    for batch in batches:
        wanted = np.array(sorted(batch), dtype=np.int64)
        matrix, at, known = held.rows(wanted)
        for i, row in zip(wanted.tolist(), at.tolist()):
            if i in stored:
                assert known[row]
                assert np.allclose(matrix[row], stored[i] / max(np.linalg.norm(stored[i]), 1e-12))
            else:
                assert not known[row] and not matrix[row].any()
    every = set().union(*batches)
    if len(every) <= budget_rows and batches[0] & stored.keys():  # all fit (their width known): each read once
        assert sorted(asked) == sorted(every)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), pairs=st.integers(0, 200), seed=st.integers(0, 2**32 - 1))
def test_pair_dots_are_row_dots_in_any_order(n: int, pairs: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = _unit(rng.standard_normal((n, 24)).astype(np.float32))
    ra, rb = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    assert np.allclose(_pair_dots(m, ra, rb), (m[ra] * m[rb]).sum(axis=1), atol=1e-6)
    sig = _unit(rng.standard_normal((n, 63)).astype(np.float32))
    assert np.allclose(_pair_similarity(sig, ra, rb, step=7), signature_similarity(sig[ra], sig[rb]), atol=1e-6)
