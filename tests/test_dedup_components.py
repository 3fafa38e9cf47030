"""Dedup's connected components (:func:`imgstore.dedup.components`) against a plain graph search."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imgstore.dedup import Edge, components


def by_search(ids: list[int], pairs: set[tuple[int, int]]) -> list[list[int]]:
    neighbours: dict[int, set[int]] = {}
    for a, b in pairs:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    seen: set[int] = set()
    out = []
    for start in sorted(neighbours):
        if start in seen:
            continue
        group, todo = set(), [start]
        while todo:
            x = todo.pop()
            if x not in group:
                group.add(x)
                todo += neighbours[x] - group
        seen |= group
        out.append(sorted(group))
    return sorted(out, key=lambda g: g[0])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), data=st.data(), shuffle=st.booleans(), chain=st.booleans())
def test_components_are_the_graphs(n: int, data: st.DataObject, shuffle: bool, chain: bool) -> None:
    ids = [3 * i + 1 for i in range(n)]
    if chain:  # a long path, numbered against its order: the slowest case for label spreading
        pairs = {(min(ids[i], ids[n - 1 - i]), max(ids[i], ids[n - 1 - i])) for i in range(n) if ids[i] != ids[n - 1 - i]}
        pairs |= {(ids[i], ids[i + 1]) for i in range(0, n - 1, 2)}
    else:
        raw = data.draw(st.lists(st.tuples(st.sampled_from(ids), st.sampled_from(ids)), max_size=80))
        pairs = {(min(a, b), max(a, b)) for a, b in raw if a != b}
    order = data.draw(st.permutations(ids)) if shuffle else ids
    edges = [Edge(a, b, None, None) for a, b in sorted(pairs)]
    assert components(list(order), edges) == by_search(ids, pairs)
