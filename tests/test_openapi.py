"""The HTTP contract: ``/openapi.json`` is valid OpenAPI, declares every endpoint's request
body and response shape, and a client generated from it (openapi-python-client, as a user
would generate one) searches a real uvicorn server by upload, by vector and by id."""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from imgstore import ImageStore
from imgstore.decode import load_image
from imgstore.serve import Thumbnails, create_app
from openapi_spec_validator import validate

from .helpers import photo, write_variants
from .test_serve import png, running


@pytest.fixture
def small_store(sqlite_url: str, tmp_path: Path) -> Any:
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root / "cat", "cat", 4)
    write_variants(photo("rocket"), root / "rocket", "rocket", 4)
    store = ImageStore(sqlite_url, cache_codes=True)
    store.ingest([root], extractor="color")
    store.create_index("lsh", 32, extractor="color")
    yield store
    store.close()


def _spec(store: ImageStore, tmp_path: Path) -> dict[str, Any]:
    return create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs")).openapi()


def test_the_spec_is_valid_openapi(small_store: ImageStore, tmp_path: Path) -> None:
    validate(_spec(small_store, tmp_path))  # raises on the first problem


def test_every_endpoint_declares_its_body_and_its_response(small_store: ImageStore, tmp_path: Path) -> None:
    spec = _spec(small_store, tmp_path)
    api = {(path, method): op for path, ops in spec["paths"].items() if path.startswith("/api") for method, op in ops.items()}
    assert len(api) >= 17
    for (path, method), op in api.items():
        ok = op["responses"].get("200") or op["responses"].get("202")
        assert ok is not None and ok.get("content"), f"{method} {path} declares no response"
        (schema,) = [c["schema"] for c in ok["content"].values()]
        assert schema not in ({}, {"type": "object"}), f"{method} {path} declares no response shape"
        assert op["operationId"] == op["operationId"].lower() and " " not in op["operationId"]
        if method in ("post", "delete") and "{" not in path and path != "/api/duplicates/apply":
            assert "requestBody" in op or path == "/api/indexes", f"{method} {path} declares no body"
    upload = spec["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert upload["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    assert upload["multipart/form-data"]["schema"]["required"] == ["image"]
    vector = upload["application/json"]["schema"]["properties"]["vector"]
    assert vector["type"] == "array" and vector["items"]["type"] == "number"
    hit = spec["components"]["schemas"]["SearchHit"]
    assert set(hit["required"]) == {"image_id", "distance", "cosine", "paths"}
    for method in ("get", "post"):
        params = {p["name"] for p in spec["paths"]["/api/search"][method]["parameters"]}
        assert {"k", "exact", "probe_radius", "rerank", "index"} <= params
    assert len(spec["paths"]["/api/search"]) == 2  # one declaration per method
    # the duplicate groups: the list once found; meanwhile 202 with the job, and where to follow it
    dup = spec["paths"]["/api/duplicates"]["get"]
    assert dup["responses"]["200"]["content"]["application/json"]["schema"]["items"]["$ref"].endswith("/GroupOut")
    accepted = dup["responses"]["202"]
    assert accepted["content"]["application/json"]["schema"]["$ref"].endswith("/JobOut")
    assert {"Location", "Retry-After"} <= set(accepted["headers"])
    assert {"keep", "min_cosine", "wait"} <= {p["name"] for p in dup["parameters"]}
    job = spec["components"]["schemas"]["JobOut"]["properties"]
    assert {"message", "result_url", "phase", "done", "total"} <= set(job)


def _generate_client(spec_url: str, where: Path) -> Any:
    """openapi-python-client's package for the spec at ``spec_url``, imported."""
    config = where / "config.yaml"
    where.mkdir(parents=True, exist_ok=True)
    config.write_text("post_hooks: []\npackage_name_override: imgstore_client\n")
    tool = Path(sys.executable).with_name("openapi-python-client")
    done = subprocess.run([str(tool), "generate", "--url", spec_url, "--output-path", str(where / "imgstore_client"),
                           "--meta", "none", "--config", str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(where))
    try:
        return importlib.import_module("imgstore_client")
    finally:
        sys.path.remove(str(where))


def test_a_generated_client_searches_a_real_server(small_store: ImageStore, tmp_path: Path) -> None:
    app = create_app(small_store, thumbnails=Thumbnails(small_store, tmp_path / "thumbs"))
    with running(app) as port:
        base = f"http://127.0.0.1:{port}"
        package = _generate_client(f"{base}/openapi.json", tmp_path / "generated")
        try:
            client_mod = importlib.import_module("imgstore_client.client")
            upload_mod = importlib.import_module("imgstore_client.api.default.search_by_upload")
            by_id_mod = importlib.import_module("imgstore_client.api.default.search_by_id")
            image_mod = importlib.import_module("imgstore_client.api.default.image")
            models = importlib.import_module("imgstore_client.models")
            types = importlib.import_module("imgstore_client.types")
            client = client_mod.Client(base_url=base, timeout=httpx.Timeout(60.0))

            body = models.SearchByUploadFilesUploadQuery(
                image=types.File(payload=io.BytesIO(png(photo("rocket"))), file_name="q.png", mime_type="image/png"))
            hits = upload_mod.sync(client=client, body=body, k=4)
            assert isinstance(hits, list) and len(hits) == 4
            assert all(isinstance(h, models.SearchHit) for h in hits)
            assert all("rocket" in h.paths[0] for h in hits)

            record = image_mod.sync(client=client, image_id=hits[0].image_id)
            assert isinstance(record, models.ImageRecord) and record.sha256

            extractor = small_store.extractor("color")
            # the picture as every decode sees it (reduced to the extractor's working size), as the upload was
            vector = extractor.extract([load_image(photo("rocket"), draft_size=extractor.draft_size).image])[0]
            as_json = models.SearchByUploadJsonVectorQuery(vector=[float(v) for v in vector])
            by_vector = upload_mod.sync(client=client, body=as_json, k=4)
            assert [h.image_id for h in by_vector] == [h.image_id for h in hits]

            by_id = by_id_mod.sync(client=client, id=hits[0].image_id, k=3)
            assert by_id[0].image_id == hits[0].image_id and len(by_id) == 3

            missing = by_id_mod.sync_detailed(client=client, id=10**6, k=3)
            assert missing.status_code == 404 and isinstance(missing.parsed, models.ErrorOut)

            # duplicate groups, found in the background: a job to follow, then the groups
            duplicates_mod = importlib.import_module("imgstore_client.api.default.duplicates")
            job_mod = importlib.import_module("imgstore_client.api.default.job")
            started = duplicates_mod.sync_detailed(client=client)
            if started.status_code == 202:
                assert isinstance(started.parsed, models.JobOut)
                job = started.parsed
                while job.state in ("queued", "running"):
                    time.sleep(0.05)
                    job = job_mod.sync(client=client, job_id=job.id)
                assert job.state == "done" and job.result_url == "/api/duplicates?keep=original"
            groups = duplicates_mod.sync(client=client)
            assert isinstance(groups, list) and groups and all(isinstance(g, models.GroupOut) for g in groups)
        finally:
            for name in [m for m in sys.modules if m == package.__name__ or m.startswith(package.__name__ + ".")]:
                del sys.modules[name]


def test_search_answers_have_the_declared_shape(small_store: ImageStore, tmp_path: Path) -> None:
    """The fast search routes serialize their hits themselves: their answers hold exactly the
    declared SearchHit fields, with the declared types."""
    spec = _spec(small_store, tmp_path)
    declared = spec["components"]["schemas"]["SearchHit"]["properties"]
    api = TestClient(create_app(small_store, thumbnails=Thumbnails(small_store, tmp_path / "thumbs")))
    answers = [api.get("/api/search", params={"id": 1, "k": 3}).json(),
               api.post("/api/search", params={"k": 3}, files={"image": ("q.png", png(photo("chelsea")), "image/png")}).json(),
               api.get("/api/images/1/neighbours", params={"k": 3}).json()]
    for hits in answers:
        assert len(hits) == 3
        for hit in hits:
            assert set(hit) == set(declared)
            assert isinstance(hit["image_id"], int) and isinstance(hit["paths"], list)
            assert isinstance(hit["distance"], int) and isinstance(hit["cosine"], float)


def test_acting_on_every_duplicate_group_must_be_asked_for(db_url: str, tmp_path: Path) -> None:
    """An empty body to /api/duplicates/apply moves nothing (it moved every duplicate once);
    ``"groups": "all"`` does, and the move can be undone."""
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root / "a", "cat", 1)
    write_variants(photo("chelsea"), root / "b", "cat", 1)  # the same bytes: one exact group
    with ImageStore(db_url) as store:
        store.ingest([root], extractor="color")
        moved_to = tmp_path / "moved"
        api = TestClient(create_app(store, allow_writes=True, move_to=moved_to, thumbnails=Thumbnails(store, tmp_path / "t")))
        before = sorted(p.name for p in root.rglob("*.png"))
        for body in ({}, {"keep": "original"}, {"groups": None}):
            refused = api.post("/api/duplicates/apply", json=body)
            assert refused.status_code == 422 and "groups" in refused.json()["error"], refused.text
        assert sorted(p.name for p in root.rglob("*.png")) == before
        assert api.post("/api/duplicates/apply", json={"groups": "everything"}).status_code == 422
        done = api.post("/api/duplicates/apply", json={"groups": "all"})
        assert done.status_code == 200, done.text
        assert len(done.json()["moved"]) == 1 and set(done.json()["moved"][0]) == {"from", "to"}
        undone = api.post("/api/duplicates/undo", json={"journal": Path(done.json()["journal"]).name})
        assert undone.status_code == 200 and len(undone.json()["restored"]) == 1
        assert sorted(p.name for p in root.rglob("*.png")) == before
