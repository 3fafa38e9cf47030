"""Ingest on a Dask cluster (real worker processes of a LocalCluster; no mocks), on SQLite and
PostgreSQL: the same store as a local ingest; a worker killed mid-run and a client killed
mid-run lose and duplicate nothing; a file that fails on a worker is recorded; --device."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from imgstore import ImageStore, cluster
from imgstore.cli import cli

from .helpers import photo, write_variants

NAMES = ("chelsea", "rocket", "coffee", "astronaut", "horse", "camera")


def collection(folder: Path, per_photo: int) -> Path:
    for name in NAMES:
        write_variants(photo(name), folder / name, name, per_photo)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def snapshot(store: ImageStore) -> dict[str, Any]:
    """What a store holds, independent of ids: content -> (paths, features, codes per index)."""
    from sqlalchemy import select

    from imgstore.models import Code, Feature, Image, ImagePath

    out: dict[str, Any] = {}
    with store.ctx.read("snapshot") as conn:
        sha = dict(conn.execute(select(Image.id, Image.sha256)).all())
        for image_id, digest in sha.items():
            out[digest] = {"paths": set(), "features": None, "codes": []}
        for image_id, path, current in conn.execute(select(ImagePath.image_id, ImagePath.path, ImagePath.is_current)):
            out[sha[image_id]]["paths"].add((path, current))
        for image_id, vector in conn.execute(select(Feature.image_id, Feature.vector)):
            out[sha[image_id]]["features"] = np.frombuffer(vector, dtype=np.float32)
        for image_id, code in conn.execute(select(Code.image_id, Code.code).order_by(Code.hasher_id)):
            out[sha[image_id]]["codes"].append(bytes(code))
    return out


def assert_same_store(local: ImageStore, remote: ImageStore, *, cosine: float = 0.99) -> None:
    a, b = snapshot(local), snapshot(remote)
    assert a.keys() == b.keys()  # the same images, by content
    for digest in a:
        assert a[digest]["paths"] == b[digest]["paths"]
        fa, fb = a[digest]["features"], b[digest]["features"]
        assert float(fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)) > cosine
    if cosine >= 0.999999:  # bit-identical features give identical codes
        assert all(a[d]["codes"] == b[d]["codes"] for d in a)
    assert local.counts().as_dict() == remote.counts().as_dict()


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"IMGSTORE_NUM_THREADS": "1"}) as local, Client(local) as client:
        yield client


def rerun_completes(command: list[str], env: dict[str, str], store: ImageStore, photos: Path, tmp_path: Path) -> None:
    """The same ingest command run again succeeds, and the store then holds what a local ingest
    of the folder stores, consistently."""
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    with ImageStore(f"sqlite:///{tmp_path / 'local.db'}") as reference:
        reference.ingest([photos], auto_index=False)
        assert_same_store(reference, store)
    assert store.verify().ok


def open_store(url: str) -> ImageStore:
    return ImageStore(url)


def test_cluster_ingest_equals_a_local_ingest(db_url: str, tmp_path: Path, dask_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default CNN on two worker processes, written by the workers (PostgreSQL) or by the
    client (SQLite): the same images, paths, features (bf16 tolerance) and codes' count."""
    monkeypatch.setattr(cluster, "PARTITION", 16)  # several tasks per worker
    photos = collection(tmp_path / "photos", 5)
    with ImageStore(f"sqlite:///{tmp_path / 'local.db'}") as local:
        expected = local.ingest([photos])
        with open_store(db_url) as remote:
            got = remote.ingest([photos], cluster=dask_client)
            assert (got.added, got.failed, got.duplicates) == (expected.added, expected.failed, expected.duplicates) == (30, 1, 0)
            assert_same_store(local, remote)
            assert [e.path for e in remote.errors()] == [str(photos / "broken.jpg")]
            assert remote.verify().ok
            again = remote.ingest([photos], cluster=dask_client)
            assert (again.added, again.unchanged) == (0, 30)


def test_color_features_identical_and_auto_index(db_url: str, tmp_path: Path, dask_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "PARTITION", 8)
    photos = collection(tmp_path / "photos", 6)
    (photos / "copy-of-chelsea.png").write_bytes(next((photos / "chelsea").glob("*.png")).read_bytes())
    with ImageStore(f"sqlite:///{tmp_path / 'local.db'}") as local, open_store(db_url) as remote:
        for store in (local, remote):
            store.ingest([photos / "chelsea", photos / "rocket"], extractor="color")
            store.create_index("lsh", 32, extractor="color")  # later batches encode with it
        local.ingest([photos], extractor="color")
        summary = remote.ingest([photos], extractor="color", cluster=dask_client)
        assert summary.duplicates == 1 and summary.added == 24
        assert_same_store(local, remote, cosine=0.9999999)


def _worker_pids(client: Any) -> dict[str, int]:
    return client.run(os.getpid)


def test_a_worker_killed_mid_run(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill one worker process while tasks run: Dask reruns its task elsewhere, the rerun skips
    what the dead worker had stored, and the store holds every image once."""
    from distributed import Client, LocalCluster

    monkeypatch.setattr(cluster, "PARTITION", 6)
    photos = collection(tmp_path / "photos", 12)
    killed: list[int] = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"IMGSTORE_NUM_THREADS": "1"}) as local, Client(local) as client:
        pids = list(_worker_pids(client).values())

        def progress(p: Any) -> None:
            if not killed and p.done > 0:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        with open_store(db_url) as remote:
            summary = remote.ingest([photos], cluster=client, progress=progress)
            assert killed, "the worker was killed during the run"
            assert summary.added + summary.duplicates + summary.unchanged == 72
            with ImageStore(f"sqlite:///{tmp_path / 'local.db'}") as reference:
                reference.ingest([photos])
                assert_same_store(reference, remote)
            assert remote.verify().ok


def test_client_killed_mid_run_then_rerun(pg_url: str, tmp_path: Path) -> None:
    """SIGKILL the whole client (and the LocalCluster it runs) mid-ingest; the same command run
    again completes the job, with every image once and every path."""
    photos = collection(tmp_path / "photos", 16)
    command = [sys.executable, "-m", "imgstore.cli", "--db", pg_url, "ingest", str(photos), "--cluster", "local:2",
               "--no-progress", "--no-auto-index"]
    env = {**os.environ, "IMGSTORE_CLUSTER_PARTITION": "4"}
    first = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with open_store(pg_url) as store:
        deadline = time.time() + 240
        while time.time() < deadline and store.counts().images == 0 and first.poll() is None:
            time.sleep(0.1)
        stored_then = store.counts().images
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        assert 0 < stored_then < 96, "killed mid-run"
        rerun_completes(command, env, store, photos, tmp_path)


def test_device_choices(sqlite_url: str, tmp_path: Path) -> None:
    import torch

    photos = collection(tmp_path / "photos", 1)
    runner = CliRunner()
    if not torch.cuda.is_available():
        out = runner.invoke(cli, ["--db", sqlite_url, "ingest", str(photos), "--device", "cuda"])
        assert out.exit_code == 1 and "--device cuda: torch sees no CUDA device" in out.output
        assert len(out.output.strip().splitlines()) == 1
    out = runner.invoke(cli, ["--db", sqlite_url, "ingest", str(photos), "--device", "auto", "--json"])
    assert out.exit_code == 0, out.output
    bad = runner.invoke(cli, ["--db", sqlite_url, "ingest", str(photos), "--cluster", "nowhere"])
    assert bad.exit_code == 1 and "scheduler address" in bad.output
    remote_loopback = runner.invoke(cli, ["--db", sqlite_url, "ingest", str(photos), "--worker-db", "x"])
    assert remote_loopback.exit_code == 2 and "--cluster" in remote_loopback.output


def test_worker_url_rules() -> None:
    from sqlalchemy.engine import make_url

    from imgstore.errors import ConfigError

    url = make_url("postgresql://app:s3cret@127.0.0.1/photos")
    with pytest.raises(ConfigError, match="--worker-db"):
        cluster.worker_url(url, None, local=False)
    assert cluster.worker_url(url, None, local=True).endswith("@127.0.0.1/photos")
    assert cluster.worker_url(url, "postgresql://app:s3cret@db.internal/photos", local=False).endswith("@db.internal/photos")
    spec = cluster.StoreSpec("postgresql://app:s3cret@db.internal/photos")
    assert "s3cret" not in repr(spec) and "s3cret" in spec.url


def test_no_dask_import_without_cluster(sqlite_url: str, tmp_path: Path) -> None:
    photos = collection(tmp_path / "photos", 1)
    code = ("import sys; from imgstore import ImageStore; s = ImageStore(sys.argv[1]); "
            "s.ingest([sys.argv[2]], extractor='color'); print('distributed' in sys.modules, 'dask' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, sqlite_url, str(photos)], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False False", out.stderr



@pytest.mark.postgres
def test_postgresql_ends_every_connection_mid_run(pg_url: str, tmp_path: Path, dask_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a PostgreSQL restart does to the writers: every connection ended mid-run. The
    transactions that were cut are run again on fresh connections (counted as retries), and the
    ingest completes with every image once, as a local ingest stores it."""
    from sqlalchemy import create_engine, text

    monkeypatch.setattr(cluster, "PARTITION", 4)
    photos = collection(tmp_path / "photos", 10)
    ended: list[int] = []
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")

    def progress(p: Any) -> None:
        if len(ended) < 2 and p.done > 8 * len(ended):  # twice, a few partitions apart
            with admin.connect() as conn:
                ended.append(int(conn.execute(text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()))

    try:
        with open_store(pg_url) as remote:
            summary = remote.ingest([photos], cluster=dask_client, progress=progress, auto_index=False)
            assert len(ended) == 2 and sum(ended) >= 2, ended
            assert summary.added + summary.duplicates == 60 and summary.failed == 1, summary
            with ImageStore(f"sqlite:///{tmp_path / 'local.db'}") as reference:
                reference.ingest([photos], auto_index=False)
                assert_same_store(reference, remote)
            assert remote.verify().ok
    finally:
        admin.dispose()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _dask_process(*args: str) -> subprocess.Popen[str]:
    dask = str(Path(sys.executable).parent / "dask")
    return subprocess.Popen([dask, *args], env={**os.environ, "IMGSTORE_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)


def _stop(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.postgres
def test_scheduler_lost_mid_run_then_rerun(pg_url: str, tmp_path: Path) -> None:
    """A Dask scheduler (`dask scheduler`, `dask worker` processes) killed mid-ingest: the
    command stops with one line that names the scheduler and says to rerun (no traceback); the
    same command against a new scheduler completes the job, every image once."""
    photos = collection(tmp_path / "photos", 16)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    command = [sys.executable, "-m", "imgstore.cli", "--db", pg_url, "ingest", str(photos), "--cluster", address,
               "--no-progress", "--no-auto-index"]
    env = {**os.environ, "IMGSTORE_CLUSTER_PARTITION": "4"}

    def start_cluster() -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
        scheduler = _dask_process("scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
        worker = _dask_process("worker", address, "--nthreads", "1", "--no-dashboard")
        return scheduler, worker

    scheduler, worker = start_cluster()
    try:
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with open_store(pg_url) as store:
            deadline = time.time() + 240
            while time.time() < deadline and store.counts().images == 0 and first.poll() is None:
                time.sleep(0.1)
            stored_then = store.counts().images
            _stop(scheduler)
            out, _ = first.communicate(timeout=180)
            assert 0 < stored_then < 96, "killed mid-run"
            assert first.returncode != 0 and "Traceback" not in out, out
            message = [line for line in out.splitlines() if line.startswith("Error:")]
            assert len(message) == 1 and address in message[0] and "rerun" in message[0], out
            _stop(worker)
            scheduler, worker = start_cluster()
            rerun_completes(command, env, store, photos, tmp_path)
    finally:
        _stop(scheduler, worker)
