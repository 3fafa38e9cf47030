"""The HTTP API on SQLite and PostgreSQL: in process through the ASGI app, and through a real
uvicorn server on a free loopback port; statuses for every mistake; no path of the client's
choosing is ever read; writes only when allowed; the token when set."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from imgstore import ImageStore
from imgstore.decode import DEFAULT_MAX_PIXELS
from imgstore.errors import ConfigError
from imgstore.cli import cli
from imgstore.serve import Thumbnails, create_app, worker_settings

from .helpers import photo, png_with_header, write_variants


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> tuple[ImageStore, Path]:
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root / "cat", "cat", 4)
    write_variants(photo("rocket"), root / "rocket", "rocket", 4)
    store = ImageStore(db_url, cache_codes=True)
    store.ingest([root], extractor="color")
    store.create_index("lsh", 32, extractor="color")
    yield store, root
    store.close()


def png(img) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def client(store: ImageStore, tmp_path: Path, **options) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs"), **options))


def test_read_api(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    store, root = served
    api = client(store, tmp_path)
    info = api.get("/api/info").json()
    assert info["images"] == 8 and info["indexes"][0]["method"] == "lsh"
    assert api.get("/api/indexes").json()[0]["is_active"] is True
    cat = store.image(str(sorted((root / "cat").iterdir())[0])).id
    shown = api.get(f"/api/images/{cat}").json()
    assert shown["id"] == cat and shown["paths"][0]["is_current"] is True
    by_id = api.get("/api/search", params={"id": cat, "k": 4}).json()
    assert by_id[0]["image_id"] == cat and all("cat" in r["paths"][0] for r in by_id)
    upload = api.post("/api/search", params={"k": 3}, files={"image": ("q.png", png(photo("chelsea")), "image/png")})
    assert upload.status_code == 200 and all("cat" in r["paths"][0] for r in upload.json())
    vector = store.extractor("color").extract([photo("rocket")])[0].tolist()
    by_vector = api.post("/api/search", params={"k": 2}, json={"vector": vector}).json()
    assert all("rocket" in r["paths"][0] for r in by_vector)
    near = api.get(f"/api/images/{cat}/neighbours", params={"k": 3}).json()
    assert len(near) == 3 and cat not in [r["image_id"] for r in near]
    assert isinstance(api.get("/api/duplicates", params={"wait": 300}).json(), list)  # found in the background
    thumb = api.get(f"/api/images/{cat}/thumbnail", params={"size": 128})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    made = list((tmp_path / "thumbs").rglob("*.jpg"))
    assert len(made) == 1  # made once, kept on disk
    assert api.get(f"/api/images/{cat}/thumbnail", params={"size": 128}).content == thumb.content
    assert api.get("/docs").status_code == 200 and "/api/search" in api.get("/openapi.json").json()["paths"]


def test_statuses(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    store, _ = served
    api = client(store, tmp_path, max_upload_bytes=200_000)
    assert api.get("/api/images/99999").status_code == 404
    assert api.get("/api/images/99999").json()["error"].startswith("no image with id")
    assert api.get("/api/search", params={"id": 99999}).status_code == 404
    text = api.post("/api/search", files={"image": ("x.png", b"not an image at all", "image/png")})
    assert text.status_code == 415 and "error" in text.json()
    big = api.post("/api/search", files={"image": ("big.png", b"\0" * 300_000, "image/png")})
    assert big.status_code == 413
    bomb = api.post("/api/search", files={"image": ("bomb.png", png_with_header(100_000, 100_000), "image/png")})
    assert bomb.status_code == 422 and ("pixels" in bomb.json()["error"] or "too large" in bomb.json()["error"])
    assert api.get("/api/info").status_code == 200  # and the server goes on
    assert api.get("/api/images/1/thumbnail", params={"size": 999}).status_code == 422
    assert api.get("/api/search", params={"id": 1, "index": 42}).status_code == 404
    assert api.get("/api/images/abc").status_code == 422
    assert api.get("/api/images/abc").json()["error"].startswith("bad argument: image_id")
    assert api.get("/api/nothing-here").json()["error"].startswith("no such page or API path")


def test_no_path_is_ever_read(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    store, _ = served
    api = client(store, tmp_path)
    for url in ("/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/../../etc/passwd/thumbnail",
                "/api/images/%2e%2e/thumbnail", "/etc/passwd", "/api/images/1%2F..%2F..%2Fetc%2Fpasswd/thumbnail"):
        response = api.get(url)
        assert response.status_code in (404, 422), url
        assert b"root:" not in response.content
    removed = store.image(1).id
    store.remove([removed])
    assert api.get(f"/api/images/{removed}/thumbnail").status_code == 404


def test_writes_need_allow_writes_and_the_token_is_checked(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    store, _ = served
    readonly = client(store, tmp_path)
    assert readonly.post("/api/images", files={"image": ("h.png", png(photo("horse")), "image/png")}).status_code == 403
    assert readonly.delete("/api/images/1").status_code == 403
    api = client(store, tmp_path, allow_writes=True, token="s3cret-token-0123456789")
    assert api.get("/api/info").status_code == 401
    assert api.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": "Bearer s3cret-token-0123456789"}
    added = api.post("/api/images", headers=auth, files={"image": ("h.png", png(photo("horse").convert("RGB")), "image/png")})
    assert added.status_code == 200
    new_id = added.json()["image_id"]
    assert api.get(f"/api/images/{new_id}", headers=auth).json()["paths"] == []
    assert api.delete(f"/api/images/{new_id}", headers=auth).json()["images"] == [new_id]
    assert api.get(f"/api/images/{new_id}", headers=auth).status_code == 404


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(app) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """A real uvicorn server for ``app`` on a free loopback port, stopped afterwards; yields the port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_real_server(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    import httpx

    store, _ = served
    with running(create_app(store, thumbnails=Thumbnails(store, tmp_path / "t"))) as port:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/api/info").json()["images"] == 8
            hits = http.post("/api/search", files={"image": ("q.png", png(photo("rocket")), "image/png")}).json()
            assert all("rocket" in r["paths"][0] for r in hits[:4])


def test_serve_refuses_other_hosts_without_a_token(db_url: str) -> None:
    out = CliRunner().invoke(cli, ["--db", db_url, "db", "upgrade"])
    assert out.exit_code == 0
    refused = CliRunner().invoke(cli, ["--db", db_url, "serve", "--host", "0.0.0.0"])
    assert refused.exit_code == 2 and "--token" in refused.output


@pytest.mark.parametrize("token", ["", " ", "x", "short-token", " s3cret-token-0123456789 "])
def test_an_empty_or_short_token_is_refused(db_url: str, token: str) -> None:
    """`--token "$UNSET"` once served every interface with no authentication at all: every
    token that would not protect anything is refused before anything listens, by the command
    and by create_app (and the environment variable's empty value the same way)."""
    assert CliRunner().invoke(cli, ["--db", db_url, "db", "upgrade"]).exit_code == 0
    for host in ("0.0.0.0", "127.0.0.1"):
        refused = CliRunner().invoke(cli, ["--db", db_url, "serve", "--host", host, "--port", "0", "--token", token])
        assert refused.exit_code == 2, refused.output
        assert "--token" in refused.output and "16 characters" in refused.output
        assert "Traceback" not in refused.output
    with ImageStore(db_url) as store, pytest.raises(ConfigError, match="16 characters"):
        create_app(store, token=token)


def test_concurrent_uploads_share_model_calls_and_overload_is_503(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    store, _ = served
    extractor = store.extractor("color")
    real = extractor.extract

    def slow(images):  # type: ignore[no-untyped-def]
        time.sleep(0.3)  # a model call that takes a while, so uploads pile up behind it
        return real(images)

    extractor.extract = slow
    app = create_app(store, thumbnails=Thumbnails(store, tmp_path / "t"), batch_max=16, batch_wait_s=0.05, queue_max=64)
    try:
        with running(app) as port:
            uploads = [png(photo(name)) for name in ("chelsea", "rocket")] * 10

            def search(data: bytes) -> httpx.Response:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                    return http.post("/api/search", params={"k": 1}, files={"image": ("q.png", data, "image/png")})

            with ThreadPoolExecutor(20) as pool:
                responses = list(pool.map(search, uploads))
            assert [r.status_code for r in responses] == [200] * 20
            for data, response in zip(uploads, responses):
                name = "cat" if data == uploads[0] else "rocket"
                assert name in response.json()[0]["paths"][0]
            batcher = app.state.batchers["color"]
            assert batcher.images == 20 and batcher.calls < 10  # 20 uploads, far fewer model calls
            # a queue that is full answers 503 at once, and the server goes on
            for b in app.state.batchers.values():
                b.max_queue = 1
            with ThreadPoolExecutor(10) as pool:
                statuses = [r.status_code for r in pool.map(search, uploads[:10])]
            assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
            for b in app.state.batchers.values():
                b.max_queue = 64
            assert search(uploads[1]).status_code == 200
    finally:
        extractor.extract = real


def test_a_client_that_disconnects_mid_upload(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    import httpx

    store, _ = served
    with running(create_app(store, thumbnails=Thumbnails(store, tmp_path / "t"))) as port:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                body = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n\r\n" + png(photo("chelsea"))[:4000]
                raw.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                            b"Content-Length: 900000\r\n\r\n" + body)
            # the connection is gone with 896 kB still promised
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert http.get("/api/info").json()["images"] == 8
            hits = http.post("/api/search", files={"image": ("q.png", png(photo("chelsea")), "image/png")})
            assert hits.status_code == 200 and "cat" in hits.json()[0]["paths"][0]


def test_an_ingest_beside_the_server(served: tuple[ImageStore, Path], tmp_path: Path, db_url: str) -> None:
    """Another process ingests into the same store while the server answers searches: every
    search succeeds, and the server finds the new images without a restart."""
    import subprocess
    import sys

    import httpx

    store, _ = served
    more = tmp_path / "more"
    for name in ("horse", "coffee", "astronaut", "camera"):
        write_variants(photo(name), more / name, name, 6)
    with running(create_app(store, thumbnails=Thumbnails(store, tmp_path / "t"))) as port:
        ingest = subprocess.Popen([sys.executable, "-m", "imgstore.cli", "--db", db_url, "ingest", str(more), "--extractor", "color"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        statuses: list[int] = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while ingest.poll() is None:
                statuses.append(http.get("/api/search", params={"id": 1, "k": 5}).status_code)
                time.sleep(0.02)
            output = ingest.communicate()[0]
            assert ingest.returncode == 0, output
            assert statuses and set(statuses) == {200}
            horse = store.image(str(sorted((more / "horse").iterdir())[0])).id
            deadline = time.time() + 20
            found: list[int] = []
            while time.time() < deadline:
                found = [h["image_id"] for h in http.get("/api/search", params={"id": horse, "k": 6}).json()]
                if horse in found:
                    break
                time.sleep(0.2)
            assert horse in found
            assert http.get("/api/info").json()["images"] == 8 + 24


def test_serve_command_mistakes(db_url: str) -> None:
    out = CliRunner().invoke(cli, ["--db", db_url, "db", "upgrade"])
    assert out.exit_code == 0
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(cli, ["--db", db_url, "serve", "--host", "0.0.0.0", "--insecure", "--port", str(port)])
    assert "warning: serving 0.0.0.0 without a token" in busy.output
    assert busy.exit_code == 1 and f"cannot listen on 0.0.0.0:{port}" in busy.output and "--port" in busy.output
    alone = CliRunner().invoke(cli, ["--db", db_url, "serve", "--move-to", "dupes"])
    assert alone.exit_code == 2 and "--allow-writes" in alone.output
    several = CliRunner().invoke(cli, ["--db", db_url, "serve", "--workers", "2", "--allow-writes"])
    assert several.exit_code == 2 and "read-only" in several.output


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_serve_with_worker_processes(served: tuple[ImageStore, Path]) -> None:
    """``imgstore serve --workers 2``: two server processes answer on one port with the token
    checked and writes refused, both give the library's answers, and Ctrl-C stops them all."""
    import signal
    import subprocess
    import sys

    import httpx

    store, root = served
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "imgstore.cli", "--db", store.url.render_as_string(hide_password=False),
                             "serve", "--port", str(port), "--workers", "2", "--token", "s3cret-token-0123456789"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        headers = {"Authorization": "Bearer s3cret-token-0123456789"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.time() + 120
            while True:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                try:
                    if http.get("/api/info", headers=headers).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.2)
            workers = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
            assert len(workers) == 2, workers
            cats = [store.image(str(p)).id for p in sorted((root / "cat").iterdir())]
            want = {i: [h.as_dict() for h in store.search(i, 4)] for i in cats}
            for _ in range(5):  # new connections each time: the kernel spreads them over the workers
                for i in cats:
                    got = httpx.get(f"http://127.0.0.1:{port}/api/search", params={"id": i, "k": 4}, headers=headers, timeout=30)
                    assert got.status_code == 200 and got.json() == want[i]
            assert http.get("/api/search", params={"id": cats[0]}).status_code == 401
            assert http.delete(f"/api/images/{cats[0]}", headers=headers).status_code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, out
    assert "2 processes" in out and "Traceback" not in out


def test_upload_pixel_limit(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    store, _ = served
    api = client(store, tmp_path, max_pixels=10_000, allow_writes=True)
    small = api.post("/api/search", files={"image": ("s.png", png(photo("chelsea").resize((90, 90))), "image/png")})
    assert small.status_code == 200
    for url in ("/api/search", "/api/images"):
        big = api.post(url, files={"image": ("b.png", png(photo("chelsea").resize((200, 200))), "image/png")})
        assert big.status_code == 422 and "40000 pixels, over the limit of 10000" in big.json()["error"]
    assert store.counts().images == 8


def test_server_and_cli_refuse_the_same_image_at_the_same_limit(served: tuple[ImageStore, Path], db_url: str,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pixel limit: the server's is its store's (it had a 64 MP one of its own), the one the
    CLI's ingest obeys, set once for the process ($IMGSTORE_MAX_PIXELS, or --max-pixels)."""
    store, _ = served
    assert store.max_pixels == DEFAULT_MAX_PIXELS
    api = client(store, tmp_path, allow_writes=True)
    for url in ("/api/search", "/api/images"):  # 95 MP: decoded (and found to hold no pixel data), not refused
        answer = api.post(url, files={"image": ("p.png", png_with_header(10_000, 9_500), "image/png")})
        assert answer.status_code == 415 and "truncated" in answer.json()["error"], answer.json()
    monkeypatch.setenv("IMGSTORE_MAX_PIXELS", "30000")
    big = tmp_path / "big.png"
    photo("chelsea").resize((200, 200)).save(big)
    ingest = CliRunner().invoke(cli, ["--db", db_url, "ingest", str(big), "--extractor", "color", "--no-progress"])
    assert ingest.exit_code == 0 and "failed 1" in ingest.output, ingest.output
    [error] = json.loads(CliRunner().invoke(cli, ["--db", db_url, "errors", "--json"]).output)
    assert error["reason"].startswith("image is 200x200 = 40000 pixels, over the limit of 30000 pixels; ")
    with ImageStore(db_url, cache_codes=True) as limited:  # as `imgstore serve` opens it, in that environment
        assert limited.max_pixels == 30_000
        assert json.loads(worker_settings(limited, None))["max_pixels"] == 30_000  # and `serve --workers N`'s
        api = client(limited, tmp_path, allow_writes=True)
        for url in ("/api/search", "/api/images"):
            answer = api.post(url, files={"image": ("big.png", big.read_bytes(), "image/png")})
            assert answer.status_code == 422 and answer.json()["error"] == f"the uploaded image: {error['reason']}"
        small = api.post("/api/search", files={"image": ("s.png", png(photo("chelsea").resize((150, 150))), "image/png")})
        assert small.status_code == 200
    assert store.counts().images == 8


def test_search_by_id_route_reads_its_arguments_and_answers_from_memory(served: tuple[ImageStore, Path], tmp_path: Path) -> None:
    """``GET /api/search`` runs on a lean route (no FastAPI parameter models): every argument
    is still read and checked, the docs still list them, and once the server holds the codes
    and vectors in memory (its start warms them) it answers as the library does."""
    store, root = served
    cat = store.image(str(sorted((root / "cat").iterdir())[0])).id
    with client(store, tmp_path) as api:  # with: the lifespan runs (refresher, warm-up)
        deadline = time.time() + 30
        while time.time() < deadline and not store.answers_from_memory():
            time.sleep(0.05)
        assert [c["vectors"] for c in api.get("/api/info").json()["cache"]] == [True]
        assert store.answers_from_memory()
        got = api.get("/api/search", params={"id": cat, "k": 5, "exact": "yes", "probe_radius": 0, "rerank": "true"})
        want = store.search(cat, 5, exact=True, probe_radius=0)
        assert got.status_code == 200 and got.json() == [h.as_dict() for h in want]
        plain = api.get("/api/search", params={"id": cat, "k": 3, "rerank": "0", "index": ""}).json()
        assert plain == [h.as_dict() for h in store.search(cat, 3, rerank=False)] and plain[0]["cosine"] is None
        for params, message in (({"k": 3}, "bad argument: give id (a stored image) or text (words)"),
                                ({"id": "abc"}, "bad argument: id: expected a whole number, got 'abc'"),
                                ({"id": cat, "k": "ten"}, "bad argument: k: expected a whole number"),
                                ({"id": cat, "exact": "maybe"}, "bad argument: exact: expected true or false")):
            bad = api.get("/api/search", params=params)
            assert bad.status_code == 422 and bad.json()["error"].startswith(message), (params, bad.json())
        assert api.get("/api/search", params={"id": 10**9}).status_code == 404
        assert api.get("/api/search", params={"id": cat, "index": 999}).status_code == 404
        assert api.get("/api/search", params={"id": cat, "k": 0}).status_code == 422
        listed = api.get("/openapi.json").json()["paths"]["/api/search"]["get"]["parameters"]
        assert [p["name"] for p in listed] == ["id", "text", "k", "exact", "probe_radius", "rerank", "index",
                                               "where", "tag", "label", "under", "taken_after", "taken_before"]
