"""The HTTP API fuzzed from its own spec (schemathesis): every operation of ``/openapi.json``,
on a real uvicorn server over a real store (colour histograms, and a few images with the default
extractor's labels, so that word searches and label filters answer), read-only and with writes
allowed, with and without a token. Every answer is a declared status with a body of the declared shape, never a 5xx, and
never a traceback. Request bodies, parameters and path values are generated from the spec."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from imgstore import ImageStore
from imgstore.serve import Thumbnails, create_app
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .helpers import photo, write_variants
from .test_serve import running

TOKEN = "fuzz-token-0123456789abcdef"
#: Requests made, per server setting (printed; the closing note reports them).
SENT: dict[str, int] = {}
EXAMPLES = 60  # generated cases per operation and setting (CI runs the same ones every time: derandomized)
#: Checks that do not apply here: "a schema-valid request is accepted" cannot hold where the
#: schema cannot say what is valid (random bytes in the ``image`` field are a binary string, and
#: not an image: 415; a vector of the wrong length for the feature space: 422).
NOT_APPLICABLE = [positive_data_acceptance]


@contextmanager
def _served(setting: str, tmp: Path) -> Iterator[Any]:
    """A real server over a small real store, and its spec loaded by schemathesis."""
    root = tmp / "photos"
    write_variants(photo("chelsea"), root / "cat", "cat", 3)
    write_variants(photo("rocket"), root / "rocket", "rocket", 3)
    write_variants(photo("chelsea"), root / "again", "cat", 1)  # the same bytes as cat_000: a duplicate group
    store = ImageStore(str(tmp / "fuzz.db"), cache_codes=True)
    store.ingest([root], extractor="color")
    store.ingest([root / "cat"], extractor="efficientnet-lite0", auto_index=False)  # its labels: ?text= answers
    store.search_text("a cat", k=1)  # the sentence model loaded now: no fuzzed request waits seconds for it
    store.create_index("lsh", 32, extractor="color")
    writes = setting != "read-only"
    token = TOKEN if setting.endswith("token") else None
    app = create_app(store, allow_writes=writes, move_to=tmp / "moved" if writes else None, token=token,
                     thumbnails=Thumbnails(store, tmp / "thumbs"))
    with running(app) as port:
        try:
            yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json",
                                                headers={"Authorization": f"Bearer {TOKEN}"} if token else {})
        finally:
            store.close()


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("setting", ["read-only", "writes", "writes+token"])
def test_every_operation_answers_as_declared(setting: str, tmp_path: Path) -> None:
    """For every operation, EXAMPLES generated requests; each answer passes schemathesis'
    checks (no 5xx, a documented status, the declared content type and body schema)."""
    headers = {"Authorization": f"Bearer {TOKEN}"} if setting.endswith("token") else {}
    with _served(setting, tmp_path) as schema:
        operations = _operations(schema)
        assert len(operations) >= 17
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                      derandomize=bool(os.environ.get("CI")))
            def check(case: Any) -> None:
                SENT[setting] = SENT.get(setting, 0) + 1
                response = case.call_and_validate(headers=headers, excluded_checks=NOT_APPLICABLE)
                assert response.status_code < 500, response.content[:500]
                assert b"Traceback" not in response.content

            check()
    assert SENT[setting] >= len(operations)
    print(f"{setting}: {SENT[setting]} generated requests over {len(operations)} operations")
