"""Managing the store from the API and the CLI, on SQLite and PostgreSQL: info, show, rm,
verify, export, dedup, contact sheets, help texts and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.errors import NotFoundError
from imgstore.samples import TRANSFORMS, write_samples

from .helpers import photo, write_variants

SMALL = {name: TRANSFORMS[name] for name in ("resize_half", "jpeg_q30", "crop_90")}


def invoke(db: str, *args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, ["--db", db, *args], catch_exceptions=False)


def test_every_command_has_help_with_an_example() -> None:
    def walk(group: click.Group, prefix: list[str]) -> list[list[str]]:
        out = []
        for name, cmd in group.commands.items():
            out.append(prefix + [name])
            if isinstance(cmd, click.Group):
                out += walk(cmd, prefix + [name])
        return out

    for path in walk(cli, []):
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, path
        assert "Example" in result.output, f"`imgstore {' '.join(path)} --help` has no example"


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys; from imgstore.cli import cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_rm_show_verify_export(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    files = write_variants(photo("chelsea"), root, "cat", 3) + write_variants(photo("rocket"), root, "rocket", 3)
    with ImageStore(db_url) as store:
        store.ingest([root], extractor="color")
        store.create_index("lsh", 32, extractor="color")
        shown = store.image(str(files[0]))
        assert shown.paths[0].path == str(files[0]) and shown.indexes and shown.feature_spaces
        removed = store.remove([str(files[0]), shown.id + 1])
        assert len(removed) == 2
        assert store.counts().images == 4
        report = store.verify()
        assert report.ok and report.dangling_rows == 0 and not report.missing_codes
        with pytest.raises(NotFoundError):
            store.image(999_999)
        files[3].unlink()
        report = store.verify()
        assert report.vanished_files == [str(files[3])] and report.ok
        rows = list(store.export_rows(neighbours=2))
        assert len(rows) == 4 and all(len(r["neighbours"]) == 2 for r in rows)
        info = store.info()
        assert info.counts.images == 4 and info.database_bytes > 0
        assert info.indexes[0].bands[0].buckets >= 1
    # the same through the CLI
    assert invoke(db_url, "verify").exit_code == 0
    out = invoke(db_url, "export", "--format", "csv")
    assert out.output.count("\n") == 5  # header + 4 images
    out = invoke(db_url, "info", "--json")
    assert json.loads(out.output)["images"] == 4
    bad = CliRunner().invoke(cli, ["--db", db_url, "rm", "999999"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and "Traceback" not in bad.output
    bad = CliRunner().invoke(cli, ["--db", db_url, "query", str(tmp_path / "nope.jpg")])
    assert bad.exit_code == 1 and "no such file" in bad.output


def test_dedup_finds_planted_copies_and_draws_sheets(db_url: str, tmp_path: Path) -> None:
    files = write_samples(tmp_path / "samples", SMALL)
    originals = [f for f in files if f.parent.name == "originals"]
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "samples"], extractor="color", auto_index=False)
        store.create_index("itq", 32, extractor="color")
        groups = store.find_duplicates(min_cosine=0.9)
        # each original with its three copies should share one group
        group_of = {}
        for n, g in enumerate(groups):
            for m in g.members:
                for p in m.paths:
                    group_of[p] = n
        found = 0
        for orig in originals:
            copies = [str(tmp_path / "samples" / "copies" / t / f"{orig.stem}.jpg") for t in SMALL]
            found += sum(group_of.get(c) is not None and group_of.get(c) == group_of.get(str(orig)) for c in copies)
        assert found >= 0.8 * 3 * len(originals), f"{found} of {3 * len(originals)} copies grouped with their original"
    out = invoke(db_url, "dedup", "--format", "json", "--min-cosine", "0.9", "--montage", str(tmp_path / "sheets"))
    assert out.exit_code == 0
    sheets = sorted((tmp_path / "sheets").glob("group-*.png"))
    assert sheets and Image.open(sheets[0]).size[0] > 200
    out = invoke(db_url, "query", str(originals[0]), "-k", "4", "--montage", str(tmp_path / "q.png"))
    assert out.exit_code == 0 and Image.open(tmp_path / "q.png").size[0] >= 5 * 200
