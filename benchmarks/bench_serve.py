"""The HTTP service under load: search by id, upload-search, one upload on an idle server.

A real ``imgstore --db URL serve`` process, and the load generator in another process of the
same run on the same (shared) cores, whose CPU is reported beside the server's, PostgreSQL's
and the rest of the machine's:

* **search by id** (``GET /api/search?id=..&k=10``: cached codes, probe radius 1, float re-rank
  on, the defaults) on ``bench_search.py``'s N synthetic 64-bit codes (default the 1M pool),
  stored with the 128-d float features they were hashed from (float32, in the feature space the
  index reads, so that search by id and the re-rank work): Debian's ``wrk`` (one thread, a Lua
  script drawing a random stored id per request) at 1, 8 and 32 connections, ``--duration``
  seconds each after a warm-up: requests/s, p50/p99 latency; and ``GET /docs`` at 8 (a constant
  page from an async endpoint: the HTTP stack's own ceiling here, no database, no threadpool);
* **upload-search** (``POST /api/search``, a 640 px JPEG in the multipart field ``image``) on
  the sample photos (``python -m imgstore.samples DIR`` then ``imgstore ingest DIR``: the default
  extractor, EfficientNet-Lite0, and the index the ingest builds): an async httpx client process
  with 16 concurrent requests for ``--upload-duration`` seconds: images/s next to the model
  alone, ``extractor.extract`` on a batch of 16 decoded images (median of ``--model-repeats``),
  measured in the same run before and after the load; then ``--single-uploads`` sequential
  uploads on the idle server (p50/p99). The same again with ``IMGSTORE_NUM_THREADS=1`` (the
  model on one core). Then, in this process: the parts of one upload (decode, model at batch 1,
  the search of a vector), the upload path's steps timed inside ``create_app`` served by uvicorn
  in a thread, and the model's batched rate beside a search loop in another process or thread.

Where the search floor is missed, the search itself is timed in this process (``store.search``
on the same store, no HTTP) with each step and each SQL statement timed apart, and, when
``py-spy`` is found (on PATH or under ``--extra-site``), the server process is sampled under
wrk at 8 connections.

Stores are built once and kept: SQLite files under ``<cache>/serve/`` (``common.cache_dir()``),
PostgreSQL databases ``imgstore_bench_serve_<N>`` and ``imgstore_bench_serve_photos`` on the
``--pg`` server (``--rebuild`` makes them again). Server variants for search by id
(``--variants``): ``serve`` (``imgstore serve`` as it is: one process), ``workers2``
(``imgstore serve --workers 2``: two processes, each with its own store, codes and vectors),
``uvloop`` (``imgstore serve`` with ``--extra-site DIR`` on the path, e.g. other versions of
uvloop and httptools), and, through ``uvicorn --factory bench_serve:app_factory`` (what
``imgstore serve`` builds): ``pool1`` (the threadpool limited to one thread), ``noguard``
(without the token/cross-site :class:`imgstore.serve.Guard` middleware), and combinations
joined by ``+`` (e.g. ``workers2+pool1``: ``uvicorn --workers 2`` over that factory).

    python benchmarks/bench_serve.py                                  # 1M, both databases
    python benchmarks/bench_serve.py --n 20000 --db sqlite --out /tmp/serve_small
    python benchmarks/bench_serve.py --variants serve,uvloop,workers2,pool1,uvloop+workers2+pool1 --extra-site /tmp/bench-extra

Needs ``wrk`` (``apt-get install wrk``). Writes benchmarks/results/serve.json and serve.md
(or ``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_search import (
    DEFAULT_PG,
    DIM,
    N_BITS,
    N_CENTRES,
    NOISE,
    POOL,
    RESULTS,
    SEED,
    Target,
    load_store,
    make_data,
)
from common import cache_dir
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from imgstore import ImageStore
from imgstore.codecache import caches
from imgstore.errors import SchemaError
from imgstore.models import FeatureSpace

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
K = 10
SEARCH_CLIENTS = (1, 8, 32)
UPLOAD_CLIENTS = 16
UPLOAD_PX = 640
MODEL_BATCH = 16
WARMUP_S = 4
#: The issue's floors.
FLOOR_SEARCH_RPS, FLOOR_SEARCH_P99_MS, FLOOR_UPLOAD_RATIO, FLOOR_SINGLE_P50_MS = 1000.0, 50.0, 0.7, 60.0
CPUS = os.cpu_count() or 1
CLK = os.sysconf("SC_CLK_TCK")
DB_ENV = "IMGSTORE_BENCH_SERVE_DB"
POOL_ENV = "IMGSTORE_BENCH_SERVE_THREADS"
NOGUARD_ENV = "IMGSTORE_BENCH_SERVE_NOGUARD"


# --- data: the search benchmark's codes with the float features they were hashed from ---------


def synthetic_vectors(n: int) -> Iterator[tuple[int, npt.NDArray[np.float64]]]:
    """(start, float64 rows) of the first ``n`` pool points, drawn exactly as ``make_data`` draws
    them (same generator, same order), so ``hasher.encode(rows)`` are its codes."""
    rng = np.random.default_rng(SEED)
    centres = rng.standard_normal((N_CENTRES, DIM))
    rng.standard_normal((DIM, N_BITS))  # the projection
    labels = rng.integers(0, N_CENTRES, size=POOL)
    step = 100_000
    for start in range(0, n, step):
        lab = labels[start : start + step]
        x = centres[lab] + NOISE * rng.standard_normal((len(lab), DIM))
        yield start, x[: n - start]


def write_features(conn: Any, space_id: int, n: int) -> None:
    """The float32 features of the first ``n`` pool points, one ``features`` row per image,
    in the caller's transaction: COPY (binary) on PostgreSQL, executemany on SQLite."""
    raw = conn.connection.dbapi_connection
    pg = conn.dialect.name == "postgresql"
    if pg:
        kinds = dict(conn.execute(text(
            "SELECT column_name, udt_name FROM information_schema.columns WHERE table_name = 'features'")).all())
        types = [kinds["space_id"], kinds["image_id"], "bytea"]
    for start, x in synthetic_vectors(n):
        blobs = np.ascontiguousarray(x, dtype="<f4")
        rows = ((space_id, start + 1 + i, blobs[i].tobytes()) for i in range(len(blobs)))
        if pg:
            with raw.cursor() as cur, cur.copy("COPY features (space_id, image_id, vector) FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(types)
                for row in rows:
                    cp.write_row(row)
        else:
            cur = raw.cursor()
            cur.executemany("INSERT INTO features (space_id, image_id, vector) VALUES (?, ?, ?)", rows)
            cur.close()


# --- stores, built once and kept --------------------------------------------------------------


def _pg_admin(pg: str) -> Any:
    return create_engine(make_url(pg).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")


def _pg_url(pg: str, name: str) -> str:
    return make_url(pg).set(drivername="postgresql", database=name).render_as_string(hide_password=False)


def _pg_exists(pg: str, name: str) -> bool:
    admin = _pg_admin(pg)
    try:
        with admin.connect() as conn:
            return conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is not None
    finally:
        admin.dispose()


def _pg_drop(pg: str, name: str) -> None:
    admin = _pg_admin(pg)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _usable(url: str, want: int, space: str | None) -> bool:
    """The kept store opens with the current schema and holds ``want`` features (in ``space``)."""
    try:
        with ImageStore(url) as store:
            with store.engine.connect() as conn:
                q = "SELECT count(*) FROM features"
                if space is not None:
                    q += f" WHERE space_id = (SELECT id FROM feature_spaces WHERE extractor = '{space}')"
                return int(conn.execute(text(q)).scalar_one()) >= want > 0
    except SchemaError as exc:
        print(f"  kept store {url}: {exc}; rebuilding", flush=True)
        return False


def synthetic_store(kind: str, n: int, pg: str, rebuild: bool) -> tuple[str, dict[str, Any]]:
    """URL of the N-code synthetic store (built now or kept from an earlier run) and its build record."""
    folder = cache_dir() / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / f"{kind}-synthetic-{n}.json"
    if kind == "sqlite":
        url = str(folder / f"synthetic-{n}.db")
        present = Path(url).exists()
    else:
        name = f"imgstore_bench_serve_{n}"
        url = _pg_url(pg, name)
        present = _pg_exists(pg, name)
    if present and not rebuild and record_path.exists() and _usable(url, n, "synthetic-gauss128"):
        record = json.loads(record_path.read_text())
        record["reused"] = True
        return url, record
    if kind == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(url + suffix).unlink(missing_ok=True)
        shutil.rmtree(url + ".thumbs", ignore_errors=True)
    elif present:
        _pg_drop(pg, name)
    hasher, codes, _ = make_data()
    check = next(synthetic_vectors(min(n, 1000)))[1]
    assert np.array_equal(hasher.encode(check), codes[: len(check)]), "synthetic_vectors must replay make_data"
    target = Target(kind, pg)  # built in a throwaway database, kept only once complete
    try:
        with ImageStore(target.url) as store:
            hasher_id, timing = load_store(store, hasher, codes[:n], vacuum=True)
            with store.engine.connect() as conn:
                space_id = int(conn.scalar(select(FeatureSpace.id).where(FeatureSpace.extractor == "synthetic-gauss128")))
            t0 = time.perf_counter()
            store.transaction(lambda conn: write_features(conn, space_id, n), what="load features")
            timing["features_s"] = time.perf_counter() - t0
            with store.engine.connect() as conn:
                if kind == "postgresql":
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    t0 = time.perf_counter()
                    for table in ("features", "images", "hashers", "feature_spaces"):
                        conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
                    timing["vacuum_features_s"] = time.perf_counter() - t0
                else:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        if kind == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                if Path(target.url + suffix).exists():
                    shutil.move(target.url + suffix, url + suffix)
        else:
            with target.admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{target.name}" RENAME TO "{name}"'))
    finally:
        target.drop()
    record = {"N": n, "hasher_id": hasher_id, "space_id": space_id, "build": timing, "reused": False,
              "built_at": time.strftime("%Y-%m-%d %H:%M:%S"), "git": _git()}
    record_path.write_text(json.dumps(record, indent=1))
    print(f"  {kind}: built the {n:,}-code store with features in {sum(v for k, v in timing.items() if k.endswith('_s') and 'per_s' not in k):.0f} s "
          f"({json.dumps({k: round(v, 1) for k, v in timing.items()})})", flush=True)
    return url, record


def photo_store(kind: str, pg: str, rebuild: bool) -> tuple[str, Path]:
    """URL of the sample-photo store (``imgstore.samples`` + ``imgstore ingest``) and its folder."""
    folder = cache_dir() / "serve"
    samples = folder / "photos"
    if kind == "sqlite":
        url = str(folder / "photos.db")
        present = Path(url).exists()
    else:
        name = "imgstore_bench_serve_photos"
        url = _pg_url(pg, name)
        present = _pg_exists(pg, name)
    marker = folder / f"{kind}-photos.done"
    if present and marker.exists() and not rebuild and _usable(url, 256, None):
        return url, samples
    if kind == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(url + suffix).unlink(missing_ok=True)
    else:
        _pg_drop(pg, name)
        admin = _pg_admin(pg)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
    subprocess.run([str(BIN / "python"), "-m", "imgstore.samples", str(samples)], check=True)
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "imgstore"), "--db", url, "ingest", str(samples)], check=True, stdout=subprocess.DEVNULL)
    print(f"  {kind}: ingested the sample photos in {time.perf_counter() - t0:.0f} s", flush=True)
    marker.write_text(url)
    return url, samples


def upload_jpegs(samples: Path, out: Path) -> list[Path]:
    """A 640 px (long side) JPEG, quality 90, of every original sample photo."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for src in sorted((samples / "originals").glob("*.png")):
        with Image.open(src) as opened:
            img = opened.convert("RGB")
        scale = UPLOAD_PX / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
        path = out / f"{src.stem}.jpg"
        img.save(path, format="JPEG", quality=90)
        files.append(path)
    return files


# --- processes and their CPU ----------------------------------------------------------------------


def _git() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False).stdout.strip()


def source_digest() -> str:
    """SHA-256 (first 12 hex) of every imgstore/*.py: which library code a run measured (the
    working tree may be ahead of the commit)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((ROOT / "imgstore").rglob("*.py")):
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)] = int(st[1])
    pids, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in pids:
                pids.add(child)
                frontier.append(child)
    total = 0
    for p in pids:
        st = _stat(p)
        if st is not None:
            total += int(st[11]) + int(st[12])
    return total / CLK


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLK


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every live PostgreSQL process by pid (the server's backends do a query's
    work outside the server process)."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text_ = (entry / "stat").read_text()
            except OSError:
                continue
            if text_[text_.index("(") + 1 : text_.rindex(")")] == "postgres":
                st = text_.rsplit(")", 1)[1].split()
                out[int(entry.name)] = (int(st[11]) + int(st[12])) / CLK
    return out


def children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class CpuWindow:
    """CPU of the server tree, of the machine, and of reaped children, over a stretch of wall time."""

    def __init__(self, server_pid: int) -> None:
        self.pid = server_pid
        self.t0, self.s0, self.m0, self.c0 = time.perf_counter(), tree_cpu_s(server_pid), machine_busy_s(), children_cpu_s()
        self.d0 = postgres_cpu()

    def close(self, loadgen_cpu_s: float | None = None) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        server = tree_cpu_s(self.pid) - self.s0
        machine = machine_busy_s() - self.m0
        loadgen = children_cpu_s() - self.c0 if loadgen_cpu_s is None else loadgen_cpu_s
        db = sum(v - self.d0.get(pid, 0.0) for pid, v in postgres_cpu().items())  # backends that ended meanwhile are lost
        return {"wall_s": wall, "server_cores": server / wall, "loadgen_cores": loadgen / wall, "postgres_cores": db / wall,
                "machine_cores": machine / wall, "other_cores": max(0.0, machine - server - loadgen - db) / wall,
                "loadgen_share": loadgen / max(machine, 1e-9)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 300.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class ThreadLimit:
    """ASGI wrapper: the serving loop's default thread limiter (where FastAPI runs sync endpoints
    and ``anyio.to_thread`` calls) set to ``tokens`` at the first call (the lifespan start)."""

    def __init__(self, app: Any, tokens: int) -> None:
        self.app, self.tokens, self.done = app, tokens, False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if not self.done:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = self.tokens
            self.done = True
        await self.app(scope, receive, send)


def app_factory() -> Any:
    """``uvicorn --factory bench_serve:app_factory``: what ``imgstore serve`` builds, for ``$IMGSTORE_BENCH_SERVE_DB``.

    With ``--workers`` uvicorn binds the listening socket itself (protocol number 0), and asyncio
    sets TCP_NODELAY only on sockets whose protocol reads IPPROTO_TCP: keep-alive responses then
    wait on Nagle + delayed ACK, 40 ms each. Set it on every TCP stream socket here, as a
    single-process ``imgstore serve`` gets it."""
    import asyncio.base_events

    from imgstore.serve import create_app

    def nodelay(sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    asyncio.base_events._set_nodelay = nodelay  # type: ignore[attr-defined]

    store = ImageStore(os.environ[DB_ENV], cache_codes=True)
    app = create_app(store)
    if os.environ.get(NOGUARD_ENV):  # the token/cross-site guard, a no-op for GETs without a token
        from imgstore.serve import Guard

        app.user_middleware = [m for m in app.user_middleware if m.cls is not Guard]
    return ThreadLimit(app, int(os.environ[POOL_ENV])) if os.environ.get(POOL_ENV) else app


class Server:
    """One server process on a free loopback port, for one store and variant."""

    def __init__(self, url: str, variant: str, extra_site: str | None, log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(extra_env or {})}
        env.pop("IMGSTORE_TOKEN", None)
        parts = set(variant.split("+"))
        if not parts <= {"serve", "uvloop", "workers2", "pool1", "noguard"} or ("serve" in parts and len(parts) > 1):
            raise ValueError(f"unknown server variant {variant!r}")
        if "uvloop" in parts:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_site, env.get("PYTHONPATH")) if p)
        if variant in ("serve", "uvloop", "workers2"):  # imgstore serve as shipped (uvicorn picks uvloop + httptools when importable)
            cmd = [str(BIN / "imgstore"), "--db", url, "serve", "--port", str(self.port)]
            if variant == "workers2":
                cmd += ["--workers", "2"]
        else:  # the same app through uvicorn's command line
            env[DB_ENV] = url
            if "pool1" in parts:
                env[POOL_ENV] = "1"
            if "noguard" in parts:
                env[NOGUARD_ENV] = "1"
            cmd = [str(BIN / "python"), "-m", "uvicorn", "bench_serve:app_factory", "--factory",
                   "--app-dir", str(Path(__file__).resolve().parent), "--port", str(self.port), "--log-level", "warning"]
            if "workers2" in parts:
                cmd += ["--workers", "2"]
            if "uvloop" in parts:
                cmd += ["--loop", "uvloop", "--http", "httptools"]
        self.command = " ".join(cmd)
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                http_get(self.base + "/api/info", timeout=60)
                break
            except OSError:
                if time.perf_counter() - t0 > 300:
                    raise
                time.sleep(0.2)
        self.ready_s = time.perf_counter() - t0

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


# --- search by id under wrk -----------------------------------------------------------------------

WRK_LUA = r"""
local n = tonumber(os.getenv("BENCH_N") or "1")
local fixed = os.getenv("BENCH_PATH")
math.randomseed(tonumber(os.getenv("BENCH_SEED") or "1"))
request = function()
  if fixed then
    return wrk.format("GET", fixed)
  end
  return wrk.format("GET", "/api/search?id=" .. math.random(1, n) .. "&k=K_VALUE")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
""".replace("K_VALUE", str(K))


def run_wrk(server: Server, n: int, clients: int, duration: float, lua: Path, seed: int, path: str | None = None) -> dict[str, Any]:
    """wrk, one thread, ``clients`` connections: a random stored id per request (or always ``path``)."""
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(lua), server.base + "/api/search"]
    env = dict(os.environ, BENCH_N=str(n), BENCH_SEED=str(seed))
    env.pop("BENCH_PATH", None)
    if path is not None:
        env["BENCH_PATH"] = path
    window = CpuWindow(server.proc.pid)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    cpu = window.close()  # wrk's CPU: the rusage of the child just reaped
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON "))
    w = json.loads(line.removeprefix("WRKJSON "))
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    return {"endpoint": path or "search by id", "clients": clients, "requests": w["requests"], "rps": w["requests"] / (w["duration_us"] / 1e6),
            "p50_ms": w["p50_us"] / 1000, "p90_ms": w["p90_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
            "max_ms": w["max_us"] / 1000, "mean_ms": w["mean_us"] / 1000, "errors": errors, **cpu}


def search_rows(kind: str, url: str, n: int, variant: str, args: argparse.Namespace, lua: Path, logdir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    server = Server(url, variant, args.extra_site, logdir / f"server-{kind}-{variant}.log")
    try:
        t0 = time.perf_counter()
        first = http_get(f"{server.base}/api/search?id=1&k={K}")  # loads the code cache and the kernels
        first_s = time.perf_counter() - t0
        assert len(first) == K and first[0]["image_id"] == 1 and first[0]["cosine"] is not None, first[:2]
        vectors_s = None  # until the server holds the re-rank's vectors in memory (its refresher attaches them)
        while time.perf_counter() - t0 < 120:
            cache = http_get(f"{server.base}/api/info").get("cache", [])
            if cache and all(c["vectors"] for c in cache):
                vectors_s = time.perf_counter() - t0
                break
            time.sleep(0.5)
        run_wrk(server, n, 8, WARMUP_S, lua, seed=99)  # every worker thread (and process) warm
        rows = []
        for i, c in enumerate(SEARCH_CLIENTS):
            r = run_wrk(server, n, c, args.duration, lua, seed=i + 1)
            rows.append({"db": kind, "N": n, "variant": variant, **r})
            print(f"  {kind} {variant:<9} {c:>2} clients: {r['rps']:>7,.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                  f"server {r['server_cores']:.2f} cores, postgres {r['postgres_cores']:.2f}, wrk {r['loadgen_cores']:.2f}, other {r['other_cores']:.2f}"
                  f"{'  ERRORS ' + str(r['errors']) if r['errors'] else ''}", flush=True)
        r = run_wrk(server, n, 8, args.duration, lua, seed=0, path="/docs")
        rows.append({"db": kind, "N": n, "variant": variant, **r})
        print(f"  {kind} {variant:<9}  8 clients on /docs: {r['rps']:>7,.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
              f"server {r['server_cores']:.2f} cores, wrk {r['loadgen_cores']:.2f}", flush=True)
        spy = None
        missed = any(r["clients"] == 8 and r["endpoint"] == "search by id" and (r["rps"] < FLOOR_SEARCH_RPS or r["p99_ms"] > FLOOR_SEARCH_P99_MS) for r in rows)
        if variant == "serve" and missed and not args.no_profile:
            spy = py_spy_profile(server, n, lua, args, logdir / f"pyspy-{kind}.txt")
        return rows, {"variant": variant, "command": server.command, "ready_s": server.ready_s, "first_search_s": first_s,
                      "vectors_ready_s": vectors_s, "py_spy": spy}
    finally:
        server.stop()


def _py_spy(extra_site: str | None) -> str | None:
    found = shutil.which("py-spy")
    if found is None and extra_site and (Path(extra_site) / "bin" / "py-spy").exists():
        found = str(Path(extra_site) / "bin" / "py-spy")
    return found


#: Where a sampled stack counts (first match from the leaf up): what one search-by-id request does.
SPY_BUCKETS = [
    ("json encoding (jsonable_encoder, json.dumps)", ("jsonable_encoder", "serialize_response", "json/encoder", "json/__init__", "render (starlette")),
    ("imgstore search: SQL statements (SQLAlchemy + driver)", ("sqlalchemy/",)),
    ("imgstore search: numpy / kernels / python", ("imgstore/",)),
    ("threadpool hand-off (anyio to_thread)", ("anyio/", "concurrent/futures", "threading.py")),
    ("HTTP parsing and framing (uvicorn h11/httptools)", ("h11/", "httptools", "uvicorn/protocols")),
    ("FastAPI / Starlette routing, params, middleware", ("fastapi/", "starlette/")),
    ("asyncio event loop", ("asyncio/", "uvloop", "selectors.py")),
]


def py_spy_profile(server: Server, n: int, lua: Path, args: argparse.Namespace, out_raw: Path) -> dict[str, Any] | None:
    """Sample the server (py-spy, 100 Hz, only the thread holding the GIL: where its Python time
    goes) while wrk runs at 8 clients; share of samples per innermost recognised layer and the top
    leaf functions."""
    spy = _py_spy(args.extra_site)
    if spy is None:
        return None
    duration = max(6, int(args.duration))
    proc = subprocess.Popen([spy, "record", "--pid", str(server.proc.pid), "--rate", "100", "--duration", str(duration),
                             "--format", "raw", "--output", str(out_raw), "--nonblocking", "--gil"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    r = run_wrk(server, n, 8, duration - 2, lua, seed=7)
    _, err = proc.communicate(timeout=60)
    if not out_raw.exists():
        return {"error": err.strip()[-500:]}
    samples: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in out_raw.read_text().splitlines():
        stack_text, _, count = line.rpartition(" ")
        frames = stack_text.split(";")
        c = int(count)
        total += c
        # layers by the innermost frame that belongs to one (a SQL call inside imgstore counts as SQL)
        for frame in reversed(frames):
            hit = next((name for name, needles in SPY_BUCKETS if any(nd in frame for nd in needles)), None)
            if hit is not None:
                samples[hit] += c
                break
        else:
            samples["other"] += c
        leaves[frames[-1].strip()] += c
    return {"rps_while_sampled": r["rps"], "samples": total, "seconds": duration, "gil_held_share": total / (100 * duration),
            "layers": {k: v / max(total, 1) for k, v in samples.most_common()},
            "top_leaves": [(k, v / max(total, 1)) for k, v in leaves.most_common(12)]}


#: Steps of ``search.search_many`` timed apart by ``direct_search``: functions of ``imgstore.search``
#: and methods of the store's context, each where it exists (none nested in another listed here).
STAGES = ("list_indexes", "find_index", "get_space", "query_vectors", "hamming_search", "cosine_rerank", "_visible", "results")
CTX_STAGES = ("space",)
CACHE_STAGES = ("indexes", "code_cache")


def _latencies(store: ImageStore, n: int, rng: np.random.Generator, seconds: float) -> dict[str, float]:
    times = []
    busy0, own0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    deadline = wall0 + seconds
    while time.perf_counter() < deadline:
        i = int(rng.integers(1, n + 1))
        t0 = time.perf_counter()
        store.search(i, K)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    ms = np.array(times) * 1000
    return {"searches": len(ms), "per_s": len(ms) / float(ms.sum() / 1000), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "other_cores": max(0.0, machine_busy_s() - busy0 - (time.process_time() - own0)) / wall}


def _breakdown(store: ImageStore, n: int, rng: np.random.Generator, n_timed: int = 200) -> dict[str, Any]:
    """The same searches with each stage of ``search_many`` and each SQL statement timed apart."""
    from collections import defaultdict

    from sqlalchemy import event

    import imgstore.catalog as catalog_mod
    import imgstore.search as search_mod

    stages: defaultdict[str, float] = defaultdict(float)
    statements: defaultdict[str, list[float]] = defaultdict(list)

    saved = [(search_mod, name, getattr(search_mod, name)) for name in STAGES if hasattr(search_mod, name)]
    saved.append((catalog_mod, "stale_among", catalog_mod.stale_among))
    saved += [(store.ctx, name, getattr(store.ctx, name)) for name in CTX_STAGES if hasattr(store.ctx, name)]
    held = caches(store.ctx)
    saved += [(held, name, getattr(held, name)) for name in CACHE_STAGES if hasattr(held, name)]
    for owner, name, fn in saved:
        label = f"ctx.{name}" if owner is store.ctx else f"caches.{name}" if owner is held else name
        setattr(owner, name, _timed(fn, label, stages))

    def before(conn: Any, *_a: Any) -> None:
        conn.info["bench_t0"] = time.perf_counter()

    def after(conn: Any, _cursor: Any, statement: str, *_a: Any) -> None:
        statements[" ".join(statement.split())[:90]].append(time.perf_counter() - conn.info["bench_t0"])

    event.listen(store.engine, "before_cursor_execute", before)
    event.listen(store.engine, "after_cursor_execute", after)
    t0 = time.perf_counter()
    try:
        for i in rng.integers(1, n + 1, size=n_timed):
            store.search(int(i), K)
    finally:
        total = time.perf_counter() - t0
        for owner, name, fn in saved:
            if owner is store.ctx or owner is held:
                delattr(owner, name)  # the bound method again
            else:
                setattr(owner, name, fn)
        event.remove(store.engine, "before_cursor_execute", before)
        event.remove(store.engine, "after_cursor_execute", after)
    stage_ms = {k: 1000 * v / n_timed for k, v in sorted(stages.items(), key=lambda kv: -kv[1])}
    stage_ms["rest"] = 1000 * total / n_timed - sum(stage_ms.values())
    sql_ms = {k: {"ms": 1000 * sum(v) / n_timed, "per_search": len(v) / n_timed}
              for k, v in sorted(statements.items(), key=lambda kv: -sum(kv[1]))}
    return {"ms_per_search": 1000 * total / n_timed, "stage_ms": stage_ms, "sql_ms": sql_ms,
            "sql_execute_ms": sum(v["ms"] for v in sql_ms.values()),
            "statements_per_search": sum(v["per_search"] for v in sql_ms.values())}


def direct_search(url: str, n: int, seconds: float = 4.0) -> dict[str, Any]:
    """``store.search(id, k)`` in this process (no HTTP), one thread: latency and where it goes."""
    rng = np.random.default_rng(5)
    with ImageStore(url, cache_codes=True) as store:
        store.start_refresher()  # as the server runs it
        try:
            store.warm()  # codes and vectors in memory, as the server holds them once warm
            store.search(1, K)
            return {**_latencies(store, n, rng, seconds), **_breakdown(store, n, rng, 300)}
        finally:
            store.stop_refresher()


# --- uploads ------------------------------------------------------------------------------------


async def _upload_load(base: str, files: list[str], clients: int, duration: float, sequential: int) -> dict[str, Any]:
    import httpx

    datas = [Path(f).read_bytes() for f in files]
    lat: list[float] = []
    status: Counter[int] = Counter()
    errors: dict[int, str] = {}  # the first answer of each failing status
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients)) as client:
        async def post(data: bytes) -> None:
            t0 = time.perf_counter()
            r = await client.post(base + "/api/search", params={"k": K}, files={"image": ("q.jpg", data, "image/jpeg")})
            lat.append(time.perf_counter() - t0)
            status[r.status_code] += 1
            if r.status_code == 200:
                assert len(r.json()) == K
            elif r.status_code not in errors:
                errors[r.status_code] = r.text[:300]

        warmup = datas[:3]
        for d in warmup:  # connection up, this process warm
            await post(d)
        lat.clear()
        status.clear()
        print("READY", flush=True)
        sys.stdin.readline()
        cpu0, t0 = time.process_time(), time.perf_counter()
        if sequential:
            for i in range(sequential):
                await post(datas[i % len(datas)])
        else:
            end = t0 + duration

            async def worker(w: int) -> None:
                i = w
                while time.perf_counter() < end:
                    await post(datas[i % len(datas)])
                    i += clients

            await asyncio.gather(*(worker(w) for w in range(clients)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "warmup_requests": len(warmup), "ok": status.get(200, 0), "status": dict(status), "errors": errors, "wall_s": wall, "client_cpu_s": cpu,
            "per_s": status.get(200, 0) / wall, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "max_ms": float(ms.max())}


def client_main(spec: str) -> None:
    """The upload client process: ``bench_serve.py _client JSON``; prints READY, waits for a line, prints JSON."""
    s = json.loads(spec)
    out = asyncio.run(_upload_load(s["base"], s["files"], s["clients"], s["duration"], s["sequential"]))
    print("RESULT " + json.dumps(out), flush=True)


def run_client(server: Server, files: list[Path], clients: int, duration: float, sequential: int) -> dict[str, Any]:
    spec = json.dumps({"base": server.base, "files": [str(f) for f in files], "clients": clients, "duration": duration, "sequential": sequential})
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_client", spec], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"upload client: {line!r}")
    window = CpuWindow(server.proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result_line = proc.stdout.readline()
    proc.wait()
    r = json.loads(result_line.removeprefix("RESULT "))
    cpu = window.close(loadgen_cpu_s=r["client_cpu_s"])
    return {**r, **cpu}


def model_alone(extractor: Any, images: list[Any], repeats: int) -> dict[str, Any]:
    """Images/s of ``extractor.extract`` on a batch of MODEL_BATCH decoded images (median of ``repeats``), and batch-1 ms."""
    batch = [images[i % len(images)] for i in range(MODEL_BATCH)]
    extractor.extract(batch)
    t16 = []
    busy0, own0, wall0 = machine_busy_s(), time.process_time(), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        extractor.extract(batch)
        t16.append(time.perf_counter() - t0)
    t1 = []
    for i in range(repeats * 2):
        t0 = time.perf_counter()
        extractor.extract([images[i % len(images)]])
        t1.append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    own = time.process_time() - own0
    return {"batch": MODEL_BATCH, "per_s": MODEL_BATCH / statistics.median(t16), "batch_s": t16,
            "own_cores": own / wall, "other_cores": max(0.0, machine_busy_s() - busy0 - own) / wall,
            "batch1_ms": 1000 * statistics.median(t1)}


def _search_loop(store: ImageStore, vectors: Any, stop: Any, counter: list[int]) -> None:
    i = 0
    while not stop.is_set():
        store.search(vectors[i % len(vectors)], K)
        i += 1
    counter.append(i)


def search_loop_main(url: str) -> None:
    """``bench_serve.py _searchloop URL``: searches of stored vectors until stdin closes."""
    import threading

    from imgstore.vectors import load_features

    with ImageStore(url, cache_codes=True) as store:
        space = max(store.feature_spaces(), key=lambda s: s.n_features)
        with store.engine.connect() as conn:
            vectors = load_features(conn, space.id, space.dim)[1][:32]
        store.search(vectors[0], K)
        stop = threading.Event()
        counter: list[int] = []
        thread = threading.Thread(target=_search_loop, args=(store, vectors, stop, counter))
        thread.start()
        print("READY", flush=True)
        sys.stdin.readline()
        stop.set()
        thread.join()
        print(counter[0], flush=True)


def model_contention(extractor: Any, images: list[Any], url: str, vectors: Any, repeats: int) -> dict[str, Any]:
    """The model's batched rate while one search loop (what each upload runs after its embedding)
    runs beside it: in another process (competing for the cores only) and in a thread of this
    process (competing for the cores and for the GIL, as the server's request threads do)."""
    import threading

    out: dict[str, Any] = {"alone": model_alone(extractor, images, repeats)["per_s"]}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_searchloop", url],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY"
    t0 = time.perf_counter()
    out["search_process"] = model_alone(extractor, images, repeats)["per_s"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model on one core, leaving the other to the requests
    try:
        out["one_thread_search_process"] = model_alone(extractor, images, repeats)["per_s"]
    finally:
        torch.set_num_threads(threads)
    proc.stdin.write("stop\n")
    proc.stdin.flush()
    out["searches_per_s_process"] = int(proc.stdout.readline()) / (time.perf_counter() - t0)
    proc.wait()
    torch.set_num_threads(1)
    try:
        out["one_thread_alone"] = model_alone(extractor, images, repeats)["per_s"]
    finally:
        torch.set_num_threads(threads)
    with ImageStore(url, cache_codes=True) as store:
        store.search(vectors[0], K)
        stop = threading.Event()
        counter: list[int] = []
        thread = threading.Thread(target=_search_loop, args=(store, vectors, stop, counter))
        thread.start()
        t0 = time.perf_counter()
        out["search_thread"] = model_alone(extractor, images, repeats)["per_s"]
        stop.set()
        thread.join()
        out["searches_per_s_thread"] = counter[0] / (time.perf_counter() - t0)
    return out


def _timed(fn: Any, label: str, into: dict[str, float]) -> Any:
    """``fn`` (sync or async) adding its wall time to ``into[label]`` on every call."""
    import functools
    import inspect

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def awrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await fn(*a, **kw)
            finally:
                into[label] += time.perf_counter() - t0
        return awrapper

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            into[label] += time.perf_counter() - t0
    return wrapper


def upload_breakdown(url: str, files: list[Path], n: int) -> dict[str, Any]:
    """Sequential uploads to ``create_app`` served by uvicorn in a thread of this process, with
    the steps of the upload path timed apart (mean ms per upload): where one upload's time goes."""
    import threading
    from collections import defaultdict

    import uvicorn

    import imgstore.decode as decode_mod
    import imgstore.serve as serve_mod

    spent: defaultdict[str, float] = defaultdict(float)


    store = ImageStore(url, cache_codes=True)
    app = serve_mod.create_app(store)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    class Here:  # what run_client needs of a Server
        base = f"http://127.0.0.1:{server.config.port}"
        proc = type("P", (), {"pid": os.getpid()})

    targets = [(serve_mod, "read_upload", "read the multipart upload"),
               (getattr(serve_mod, "Service", None), "batcher_for", "find space + extractor (SQL)"),
               (decode_mod, "load_image", "decode (load_image)"),
               (serve_mod.Batcher, "embed", "wait for the batch + model"),
               (store, "search", "store.search(vector)")]
    saved = []
    try:
        run_client(Here, files[:2], 1, 0, sequential=2)  # loads the extractor
        ex = next(iter(store.ctx._extractors.values()))  # the one the batcher calls
        targets.append((ex, "extract", "model (extract, batch 1)"))
        for owner, name, label in targets:
            if owner is not None and hasattr(owner, name):
                saved.append((owner, name, owner.__dict__.get(name) if isinstance(owner, type) or owner in (serve_mod, decode_mod) else None))
                setattr(owner, name, _timed(getattr(owner, name), label, spent))
        spent.clear()
        r = run_client(Here, files, 1, 0, sequential=n)
    finally:
        for owner, name, fn in saved:
            if fn is not None:
                setattr(owner, name, fn)
            else:
                delattr(owner, name)  # an instance attribute shadowing the method
        server.should_exit = True
        thread.join(timeout=30)
        store.close()
    steps = {k: 1000 * v / (r["requests"] + r["warmup_requests"]) for k, v in spent.items()}  # warm-ups ran through the timers too
    model = steps.get("model (extract, batch 1)", 0.0)
    if "wait for the batch + model" in steps:
        steps["wait for the batch + model"] -= model  # the wait and hand-offs only
        steps["batch wait + thread hand-offs"] = steps.pop("wait for the batch + model")
    steps["HTTP, routing, threadpool, JSON (the rest)"] = r["mean_ms"] - sum(steps.values())
    return {"uploads": r["requests"], "mean_ms": r["mean_ms"], "p50_ms": r["p50_ms"], "steps_ms": steps}


def upload_rows(kind: str, url: str, files: list[Path], args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    from imgstore.decode import load_image
    from imgstore.features import get_extractor

    with ImageStore(url) as store:
        space = max(store.feature_spaces(), key=lambda s: s.n_features)
        indexes = [i.as_dict() for i in store.indexes() if i.is_active]
    extractor = get_extractor(space.extractor)  # what the server's store builds (no options)
    datas = [f.read_bytes() for f in files]
    decode_ms = []
    for d in datas * 3:
        t0 = time.perf_counter()
        load_image(d, draft_size=extractor.draft_size)
        decode_ms.append(1000 * (time.perf_counter() - t0))
    images = [load_image(d, draft_size=extractor.draft_size).image for d in datas]
    vectors = extractor.extract(images)
    with ImageStore(url, cache_codes=True) as store:  # the search of a ready vector, as the server runs it
        store.search(vectors[0], K)
        search_ms = []
        for v in list(vectors) * 3:
            t0 = time.perf_counter()
            store.search(v, K)
            search_ms.append(1000 * (time.perf_counter() - t0))

    server = Server(url, "serve", None, logdir / f"server-{kind}-photos.log")
    try:
        t0 = time.perf_counter()
        run_client(server, files[:1], 1, 0, sequential=1)  # loads the extractor in the server
        warm_s = time.perf_counter() - t0
        run_client(server, files, UPLOAD_CLIENTS, WARMUP_S, 0)  # the batcher and threadpool warm
        before = model_alone(extractor, images, args.model_repeats)
        load = run_client(server, files, UPLOAD_CLIENTS, args.upload_duration, 0)
        after = model_alone(extractor, images, args.model_repeats)
        time.sleep(1.0)
        single = run_client(server, files, 1, 0, sequential=args.single_uploads)
    finally:
        server.stop()
    # the same server with the model on one torch thread, the other core left to the requests
    server1 = Server(url, "serve", None, logdir / f"server-{kind}-photos-1thread.log", {"IMGSTORE_NUM_THREADS": "1"})
    try:
        run_client(server1, files[:1], 1, 0, sequential=1)
        run_client(server1, files, UPLOAD_CLIENTS, WARMUP_S, 0)
        load1 = run_client(server1, files, UPLOAD_CLIENTS, args.upload_duration, 0)
        time.sleep(1.0)
        single1 = run_client(server1, files, 1, 0, sequential=args.single_uploads)
    finally:
        server1.stop()
    model_rate = MODEL_BATCH / statistics.median(before["batch_s"] + after["batch_s"])
    contention = model_contention(extractor, images, url, vectors, args.model_repeats)
    breakdown = upload_breakdown(url, files, args.single_uploads)
    out = {"db": kind, "store": {"feature_space": space.as_dict(), "active_index": indexes},
           "extractor": {"name": space.extractor, "precision": getattr(extractor, "precision", None),
                         "draft_size": extractor.draft_size, "torch_threads": __import__("torch").get_num_threads()},
           "command": server.command, "first_upload_s": warm_s,
           "model_alone": {"per_s": model_rate, "before": before, "after": after},
           "load": {"clients": UPLOAD_CLIENTS, **load, "ratio_to_model": load["per_s"] / model_rate},
           "single": single, "model_contention": contention,
           "one_thread": {"command": "IMGSTORE_NUM_THREADS=1 " + server1.command, "load": {"clients": UPLOAD_CLIENTS, **load1, "ratio_to_model": load1["per_s"] / model_rate},
                          "single": single1}, "single_breakdown": breakdown,
           "parts_ms": {"decode_640px_jpeg": statistics.median(decode_ms), "model_batch1": statistics.median([before["batch1_ms"], after["batch1_ms"]]),
                        "search_of_vector": statistics.median(search_ms)}}
    print(f"  {kind} uploads: {load['per_s']:.1f} images/s with {UPLOAD_CLIENTS} clients (p50 {load['p50_ms']:.0f} ms, "
          f"p99 {load['p99_ms']:.0f} ms) vs model alone {model_rate:.1f} images/s at batch {MODEL_BATCH}: "
          f"{out['load']['ratio_to_model']:.2f}x; server {load['server_cores']:.2f} cores, client {load['loadgen_cores']:.2f}; "
          f"one upload idle p50 {single['p50_ms']:.1f} ms, p99 {single['p99_ms']:.1f} ms "
          f"(decode {out['parts_ms']['decode_640px_jpeg']:.1f}, model b1 {out['parts_ms']['model_batch1']:.1f}, "
          f"search {out['parts_ms']['search_of_vector']:.1f} ms)", flush=True)
    return out


# --- report ---------------------------------------------------------------------------------------


def floors(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in report["search"]:
        if r["clients"] == 8 and r["variant"] in ("serve", "workers2") and r["endpoint"] == "search by id":
            how = "imgstore serve" if r["variant"] == "serve" else "imgstore serve --workers 2"
            out.append({"floor": f"{r['db']} N={r['N']:,}, {how}: search by id >= {FLOOR_SEARCH_RPS:,.0f} req/s at 8 clients, p99 <= {FLOOR_SEARCH_P99_MS:.0f} ms",
                        "value": f"{r['rps']:,.0f} req/s, p99 {r['p99_ms']:.1f} ms",
                        "holds": r["rps"] >= FLOOR_SEARCH_RPS and r["p99_ms"] <= FLOOR_SEARCH_P99_MS and r["errors"] == 0})
    for u in report["uploads"]:
        out.append({"floor": f"{u['db']} photos: upload-search with {UPLOAD_CLIENTS} clients >= {FLOOR_UPLOAD_RATIO} x model alone (batch {MODEL_BATCH})",
                    "value": f"{u['load']['per_s']:.1f} vs {u['model_alone']['per_s']:.1f} images/s = {u['load']['ratio_to_model']:.2f}x",
                    "holds": u["load"]["ratio_to_model"] >= FLOOR_UPLOAD_RATIO and u["load"]["ok"] == u["load"]["requests"]})
        out.append({"floor": f"{u['db']} photos: one upload of a {UPLOAD_PX} px JPEG, idle server, p50 <= {FLOOR_SINGLE_P50_MS:.0f} ms",
                    "value": f"p50 {u['single']['p50_ms']:.1f} ms (p99 {u['single']['p99_ms']:.1f} ms, {u['single']['requests']} uploads"
                             + (f", {u['single']['requests'] - u['single']['ok']} not answered 200)" if u['single']['ok'] < u['single']['requests'] else ")"),
                    "holds": u["single"]["p50_ms"] <= FLOOR_SINGLE_P50_MS and u["single"]["ok"] == u["single"]["requests"]})
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# HTTP service under load: search by id, upload-search, one upload",
        "",
        f"`{report['command']}`  ",
        f"{report['machine']}; library commit {report['git']} (imgstore/*.py sha256 {report.get('source_at_start', '?')}). Server and load generator share the cores; "
        "CPU is in cores (1.00 = one core busy for the whole run); 'other' is the rest of the machine's busy time "
        "(processes outside this benchmark and its database; PostgreSQL's CPU is all `postgres` processes). Search by id: k=10, cached codes, probe radius 1, float re-rank on (the "
        f"defaults), a random stored id per request; wrk one thread, {report['duration_s']:g} s per row after a {WARMUP_S} s warm-up.",
        "",
        "## Search by id (`GET /api/search?id=..&k=10`)",
        "",
        "| db | N | server | request | clients | req/s | p50 ms | p99 ms | max ms | errors | server CPU | PostgreSQL CPU | wrk CPU | wrk share of busy CPU | other CPU |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["search"]:
        lines.append(f"| {r['db']} | {r['N']:,} | {r['variant']} | {r['endpoint']} | {r['clients']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['max_ms']:.0f} | {r['errors']} | {r['server_cores']:.2f} | {r['postgres_cores']:.2f} | {r['loadgen_cores']:.2f} | {100 * r['loadgen_share']:.0f}% | {r['other_cores']:.2f} |")
    for sup in report.get("supplementary", []):
        lines += ["", f"Another run, side by side within itself: `{sup['command']}` ({sup['note']})", "",
                  "| db | N | server | request | clients | req/s | p50 ms | p99 ms | errors | server CPU | wrk CPU | other CPU |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sup["rows"]:
            lines.append(f"| {r['db']} | {r['N']:,} | {r['variant']} | {r['endpoint']} | {r['clients']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
                         f"{r['p99_ms']:.2f} | {r['errors']} | {r['server_cores']:.2f} | {r['loadgen_cores']:.2f} | {r['other_cores']:.2f} |")
    lines += ["", "Servers: " + "; ".join(f"**{s['db']} {s['variant']}**: `{s['command'].replace(str(ROOT) + '/', '')}` "
                                          f"(ready {s['ready_s']:.1f} s, first search {s['first_search_s']:.2f} s"
                                          + (f", vectors in memory after {s['vectors_ready_s']:.1f} s" if s.get("vectors_ready_s") else "") + ")" for s in report["servers"])]
    if report["direct"]:
        lines += ["", "### The search alone, in process (`store.search(id, 10)`, one thread, no HTTP, background refresher on)", "",
                  "| db | N | searches/s | p50 ms | p99 ms | other CPU | SQL statements | SQL execute ms | ms by step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for d in report["direct"]:
            st = ", ".join(f"{k} {v:.2f}" for k, v in d["stage_ms"].items())
            lines.append(f"| {d['db']} | {d['N']:,} | {d['per_s']:,.0f} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | "
                         f"{d['other_cores']:.2f} | {d['statements_per_search']:.1f} | {d['sql_execute_ms']:.2f} | {st} |")
        lines += ["", "Slowest SQL statements per search (time in the driver's execute; statements per search):", ""]
        for d in report["direct"]:
            top = list(d["sql_ms"].items())[:4]
            lines.append(f"- **{d['db']}**: " + "; ".join(f"`{k}...` {v['ms']:.2f} ms ({v['per_search']:.1f}x)" for k, v in top))
    spies = [s for s in report["servers"] if s.get("py_spy") and "layers" in s["py_spy"]]
    if spies:
        lines += ["", "### Where the server's Python time goes at 8 clients (py-spy --gil, 100 Hz: the thread holding the GIL; innermost recognised layer)", ""]
        for s in spies:
            p = s["py_spy"]
            lines.append(f"- **{s['db']}** ({p['samples']:,} samples in {p.get('seconds', 0):.0f} s: the GIL held {100 * p.get('gil_held_share', 0):.0f}% of the time; "
                         f"{p['rps_while_sampled']:,.0f} req/s while sampled): "
                         + ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["layers"].items()))
            lines.append("  - top leaf functions: " + ", ".join(f"`{k}` {100 * v:.0f}%" for k, v in p["top_leaves"][:6]))
    if report["uploads"]:
        lines += ["", "## Upload-search on the sample photos (`POST /api/search`, 640 px JPEG)", "",
                  "| db | images | server | clients | images/s | model alone, images/s (batch 16, 2 threads) | ratio | p50 ms | p99 ms | non-200 | server CPU | PostgreSQL CPU | client CPU | client share of busy CPU | other CPU | other CPU, model alone |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for u in report["uploads"]:
            n_img = u["store"]["feature_space"]["n_features"]
            for label, ld in (("serve", u["load"]), ("serve, IMGSTORE_NUM_THREADS=1", u["one_thread"]["load"])):
                lines.append(f"| {u['db']} | {n_img} | {label} | {ld['clients']} | {ld['per_s']:.1f} | {u['model_alone']['per_s']:.1f} | {ld['ratio_to_model']:.2f} | "
                             f"{ld['p50_ms']:.0f} | {ld['p99_ms']:.0f} | {ld['requests'] - ld['ok']} | {ld['server_cores']:.2f} | {ld['postgres_cores']:.2f} | "
                             f"{ld['loadgen_cores']:.2f} | {100 * ld['loadgen_share']:.0f}% | {ld['other_cores']:.2f} | "
                             f"{statistics.fmean([u['model_alone']['before']['other_cores'], u['model_alone']['after']['other_cores']]):.2f} |")
        lines += ["", "One upload on an idle server (sequential), and its parts timed in this process:", "",
                  "| db | server | uploads | p50 ms | p99 ms | mean ms | decode ms (draft) | model batch 1 ms (2 threads) | search of a vector ms |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for u in report["uploads"]:
            p = u["parts_ms"]
            for label, s in (("serve", u["single"]), ("serve, IMGSTORE_NUM_THREADS=1", u["one_thread"]["single"])):
                lines.append(f"| {u['db']} | {label} | {s['requests']} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['mean_ms']:.1f} | "
                             f"{p['decode_640px_jpeg']:.1f} | {p['model_batch1']:.1f} | {p['search_of_vector']:.1f} |"
                             + (f" **{s['requests'] - s['ok']} not 200: {s.get('errors')}**" if s["ok"] < s["requests"] else ""))
        lines += ["", "Where one upload's time goes: the same sequential uploads to `create_app` served by uvicorn in a thread "
                  "of the benchmark process, each step of the upload path timed (mean ms per upload):", ""]
        for u in report["uploads"]:
            b = u["single_breakdown"]
            lines.append(f"- **{u['db']}**: mean {b['mean_ms']:.1f} ms (p50 {b['p50_ms']:.1f}) = "
                         + " + ".join(f"{k} {v:.1f}" for k, v in sorted(b["steps_ms"].items(), key=lambda kv: -kv[1])))
        lines += ["", "The model's batched rate (images/s, batch 16) beside one loop of the search each upload runs "
                  "(`store.search(vector, 10)` on this store): the loop in another process competes for the cores only; in a thread "
                  "of the model's process, as the server's request threads do, it competes for the GIL too:", "",
                  "| db | torch threads | model alone | + search loop in a process (its searches/s) | + search loop in a thread (its searches/s) |",
                  "|---|---:|---:|---:|---:|"]
        for u in report["uploads"]:
            c = u["model_contention"]
            lines.append(f"| {u['db']} | {u['extractor']['torch_threads']} | {c['alone']:.1f} | {c['search_process']:.1f} "
                         f"({c['searches_per_s_process']:.0f} over both runs) | {c['search_thread']:.1f} ({c['searches_per_s_thread']:.0f}) |")
            lines.append(f"| {u['db']} | 1 | {c['one_thread_alone']:.1f} | {c['one_thread_search_process']:.1f} | |")
        u0 = report["uploads"][0]
        lines += ["", f"Extractor {u0['extractor']['name']} ({u0['extractor']['precision']}, {u0['extractor']['torch_threads']} torch threads, "
                  f"draft decode to {u0['extractor']['draft_size']}); model alone = `extractor.extract` on {MODEL_BATCH} decoded images, "
                  f"median of {report['model_repeats']} before and {report['model_repeats']} after the load, in the benchmark process while the server idles."]
    lines += ["", "## Floors", "", "| floor | measured | holds |", "|---|---|---|"]
    for f in report["floors"]:
        lines.append(f"| {f['floor']} | {f['value']} | {'yes' if f['holds'] else '**no**'} |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=POOL, help=f"synthetic codes and features (<= {POOL:,})")
    ap.add_argument("--db", default="both", choices=("sqlite", "postgresql", "both"))
    ap.add_argument("--pg", default=os.environ.get("IMGSTORE_TEST_PG_URL", DEFAULT_PG), help="PostgreSQL server and maintenance database")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per search-by-id row")
    ap.add_argument("--upload-duration", type=float, default=15.0, help="seconds of the 16-client upload run")
    ap.add_argument("--single-uploads", type=int, default=30)
    ap.add_argument("--model-repeats", type=int, default=5)
    ap.add_argument("--variants", default="serve", help="comma-separated server variants for search by id: serve, uvloop, workers2")
    ap.add_argument("--extra-site", default=os.environ.get("IMGSTORE_BENCH_EXTRA_SITE"),
                    help="a folder with uvloop + httptools (the uvloop variant) and bin/py-spy (profiling)")
    ap.add_argument("--no-search", action="store_true")
    ap.add_argument("--no-uploads", action="store_true")
    ap.add_argument("--no-profile", action="store_true", help="no in-process search profile or py-spy where a floor is missed")
    ap.add_argument("--rebuild", action="store_true", help="build the kept stores again")
    ap.add_argument("--out", default=str(RESULTS / "serve"), help="result files: OUT.json and OUT.md")
    ap.add_argument("--remake-md", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = ap.parse_args(argv)
    if args.remake_md:
        save(json.loads(Path(f"{args.out}.json").read_text()), Path(args.out))
        return 0
    if not 0 < args.n <= POOL:
        ap.error(f"--n must be in 1..{POOL:,}")
    if shutil.which("wrk") is None and not args.no_search:
        ap.error("wrk is not installed (apt-get install wrk)")
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    variants = [v for v in args.variants.split(",") if v]
    notes: list[str] = []
    env = dict(os.environ, PYTHONPATH=args.extra_site or "")
    if any("uvloop" in v for v in variants) and subprocess.run(
            [sys.executable, "-c", "import uvloop, httptools"], env=env, capture_output=True, check=False).returncode:
        notes.append("variants with uvloop skipped: uvloop/httptools not importable (give --extra-site)")
        variants = [v for v in variants if "uvloop" not in v]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    lua = logdir / "search.lua"
    lua.write_text(WRK_LUA)
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_serve.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {CPUS} cores (shared)",
        "git": _git(), "source_at_start": source_digest(), "duration_s": args.duration, "model_repeats": args.model_repeats,
        "versions": {"python": platform.python_version(), "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split(" [")[0]
                     if shutil.which("wrk") else None,
                     **{m: __import__(m).__version__ for m in ("fastapi", "starlette", "uvicorn", "httpx", "numpy", "sqlalchemy")}},
        "stores": {}, "search": [], "servers": [], "direct": [], "uploads": [], "notes": notes, "logs": str(logdir),
    }
    for kind in dbs:
        if not args.no_search:
            t0 = time.perf_counter()
            url, record = synthetic_store(kind, args.n, args.pg, args.rebuild)
            report["stores"][f"{kind}-synthetic"] = {**record, "ready_s": time.perf_counter() - t0}
            for variant in variants:
                rows, server = search_rows(kind, url, args.n, variant, args, lua, logdir)
                report["search"] += rows
                report["servers"].append({"db": kind, **server})
            missed = any(r["db"] == kind and r["variant"] == "serve" and r["clients"] == 8 and r["endpoint"] == "search by id" and
                         (r["rps"] < FLOOR_SEARCH_RPS or r["p99_ms"] > FLOOR_SEARCH_P99_MS) for r in report["search"])
            if missed and not args.no_profile:
                d = direct_search(url, args.n)
                report["direct"].append({"db": kind, "N": args.n, **d})
                print(f"  {kind} store.search in process: {d['per_s']:,.0f}/s, p50 {d['p50_ms']:.2f} ms; ms by step "
                      + ", ".join(f"{k} {v:.2f}" for k, v in d["stage_ms"].items()), flush=True)
        if not args.no_uploads:
            purl, samples = photo_store(kind, args.pg, args.rebuild)
            files = upload_jpegs(samples, logdir / "uploads")
            report["uploads"].append(upload_rows(kind, purl, files, args, logdir))
    report["source_at_end"] = source_digest()
    if report["source_at_end"] != report["source_at_start"]:
        notes.append(f"imgstore's source changed during the run ({report['source_at_start']} -> {report['source_at_end']}): "
                     "rows before and after the change measured different code")
    save(report, out)
    return 0


def save(report: dict[str, Any], out: Path) -> None:
    """Judge the floors, write OUT.json and OUT.md, print the table."""
    report["floors"] = floors(report)
    Path(f"{out}.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    Path(f"{out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_client":
        client_main(sys.argv[2])
        raise SystemExit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "_searchloop":
        search_loop_main(sys.argv[2])
        raise SystemExit(0)
    raise SystemExit(main())
