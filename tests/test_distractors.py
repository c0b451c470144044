"""Distractors: the revisitop1m download against a local fault-injecting server, and runs whose
database is a benchmark plus a generated distractor set (engine, --engine serial, Ray)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fault_server import Fault, FaultServer

from gldboxes.cli.main import main as cli_main
from gldboxes.executor import SerialExecutor, read_done
from gldboxes.io import read_json
from retrieval.evaluation.datasets import RevisitedDataset
from retrieval.evaluation.distractors import (
    REVISITOP1M_ARCHIVES,
    REVISITOP1M_BASE_URL,
    archive_name,
    count_label,
    distractor_images,
    download_revisitop1m,
    parse_archives,
)
from retrieval.evaluation.evaluate import evaluate_protocols

REPO = Path(__file__).resolve().parents[1]
NET: dict[str, Any] = {"retries": 3, "backoff": 0.02, "timeout": 2.0}


# ----------------------------------------------------------------------------- test mirror
def make_tgz(members: dict[str, bytes]) -> bytes:
    """A gzip'd tar with ``members`` (fixed mtimes: the same bytes every time)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


def revisitop1m_mirror(
    n_archives: int = REVISITOP1M_ARCHIVES, per_archive: int = 2, image_bytes: int = 300
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Files of a revisitop1m-layout mirror and its images ``{path under jpg/: bytes}``.

    Images are random bytes (incompressible: deflate stores them, so a flipped byte is only
    caught by the gzip CRC) under nested paths like ``07/3/<hex>.jpg``.
    """
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    images: dict[str, bytes] = {}
    for a in range(1, n_archives + 1):
        members = {}
        for j in range(per_archive):
            name = f"{a:02d}/{j}/{rng.bytes(6).hex()}.jpg"
            members[name] = rng.bytes(image_bytes)
        images.update(members)
        files[f"jpg/{archive_name(a)}"] = make_tgz(members)
    files["revisitop1m.txt"] = "".join(f"{n}\n" for n in images).encode()
    return files, images


def check_images(root: Path, images: dict[str, bytes]) -> None:
    for rel, data in images.items():
        assert (root / "jpg" / rel).read_bytes() == data, rel


def flip_middle_byte(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]


# ------------------------------------------------------------------------------- no server
class TestNames:
    def test_parse_archives(self) -> None:
        assert parse_archives(None) == list(range(1, 101))
        assert parse_archives("all") == list(range(1, 101))
        assert parse_archives("1-3, 7,3") == [1, 2, 3, 7]
        assert parse_archives([5, 2, 5]) == [2, 5]
        for bad in ("0-3", "99-101", "3-1", "x", "1-"):
            with pytest.raises(ValueError, match="--archives"):
                parse_archives(bad)

    def test_names_and_count_label(self) -> None:
        assert archive_name(1) == "revisitop1m.1.tar.gz"
        assert archive_name(100) == "revisitop1m.100.tar.gz"
        assert REVISITOP1M_BASE_URL == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"
        assert [count_label(n) for n in (48, 999, 1000, 12_000, 123_456, 1_001_001)] == [
            "48",
            "999",
            "1k",
            "12k",
            "123k",
            "1m",
        ]

    def test_cli_errors(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        dl = ["retrieval", "download"]
        assert cli_main([*dl, "revisitop1m", "--out", str(tmp_path), "--archives", "0-3"]) == 2
        assert "--archives: '0-3' is outside 1-100" in capsys.readouterr().err
        assert cli_main([*dl, "roxford5k", "--out", str(tmp_path), "--engine", "ray"]) == 2
        assert "apply to revisitop1m" in capsys.readouterr().err
        assert not list(tmp_path.iterdir())  # refused before anything was written

    def test_images_follow_the_list(self, tmp_path: Path) -> None:
        (tmp_path / "jpg" / "b").mkdir(parents=True)
        for n in ("b/2.jpg", "1.jpg", "3.jpg"):
            (tmp_path / "jpg" / n).write_bytes(b"x")
        (tmp_path / "revisitop1m.txt").write_text("3.jpg\nb/2.jpg\nmissing.jpg\n1.jpg\n")
        got = [(i, p.relative_to(tmp_path).as_posix()) for i, p in distractor_images(tmp_path)]
        assert got == [("3.jpg", "jpg/3.jpg"), ("b__2.jpg", "jpg/b/2.jpg"), ("1.jpg", "jpg/1.jpg")]
        # any other folder: every image under it, sorted by path
        ids = [i for i, _ in distractor_images(tmp_path / "jpg")]
        assert ids == ["1.jpg", "3.jpg", "b__2.jpg"]
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="no images"):
            distractor_images(tmp_path / "empty")
        with pytest.raises(FileNotFoundError, match="--distractors"):
            distractor_images(tmp_path / "nope")


# ------------------------------------------------------------------------------- download
@pytest.fixture(scope="module")
def mirror_files() -> tuple[dict[str, bytes], dict[str, bytes]]:
    return revisitop1m_mirror()


@pytest.mark.server
class TestDownload:
    def test_all_archives_faults_and_rerun(
        self, tmp_path: Path, mirror_files: tuple[dict[str, bytes], dict[str, bytes]]
    ) -> None:
        files, images = mirror_files
        with FaultServer(files) as srv:
            srv.add_fault("jpg/revisitop1m.2.tar.gz", Fault(drop_after=200))  # resumed: Range
            srv.add_fault("jpg/revisitop1m.3.tar.gz", Fault(corrupt=True))  # bad once: refetched
            srv.add_fault("jpg/revisitop1m.4.tar.gz", Fault(status=503, times=2))
            rep = download_revisitop1m(
                tmp_path, base_url=srv.base_url, executor=SerialExecutor(progress=False), **NET
            )
            assert rep.ok, rep.failed
            assert len(rep.done) == 100 and rep.skipped == []
            assert rep.images == 200 and rep.listed == 200 and rep.present == 200
            check_images(tmp_path, images)
            assert srv.hits("jpg/revisitop1m.3.tar.gz") == 2
            assert srv.hits("jpg/revisitop1m.4.tar.gz") == 3
            resumed = srv.requests("jpg/revisitop1m.2.tar.gz")
            assert [r.range_start for r in resumed] == [None, 200]
            manifest = read_json(tmp_path / "manifest.json")
            assert sorted(manifest["archives"]) == sorted(archive_name(i) for i in range(1, 101))
            for i in (1, 3, 100):
                entry = manifest["archives"][archive_name(i)]
                data = files[f"jpg/{archive_name(i)}"]
                assert entry["md5"] == hashlib.md5(data).hexdigest()
                assert entry["bytes"] == len(data) and entry["images"] == 2
            assert not list((tmp_path / "archives").iterdir())  # extracted, then removed
            assert (tmp_path / "shards" / "archive-007" / "images.txt").read_text().split() == (
                sorted(n for n in images if n.startswith("07/"))
            )
            # A rerun fetches nothing but the (small) image list check.
            hits = srv.hits("jpg/*")
            again = download_revisitop1m(
                tmp_path, base_url=srv.base_url, executor=SerialExecutor(progress=False), **NET
            )
            assert again.ok and again.done == [] and len(again.skipped) == 100
            assert again.images == 0 and again.present == 200
            assert srv.hits("jpg/*") == hits

    def test_bad_archive_is_never_extracted(
        self,
        tmp_path: Path,
        mirror_files: tuple[dict[str, bytes], dict[str, bytes]],
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        files, images = mirror_files
        good = files["jpg/revisitop1m.2.tar.gz"]
        bad = {**files, "jpg/revisitop1m.2.tar.gz": flip_middle_byte(good)}  # CRC mismatch
        with FaultServer(bad) as srv:
            argv = ["-q", "retrieval", "download", "revisitop1m", "--out", str(tmp_path)]
            argv += ["--archives", "1-3", "--base-url", srv.base_url, "--no-progress"]
            argv += ["--retries", "2", "--backoff", "0.02", "--timeout", "2"]
            assert cli_main(argv) == 1
            out = capsys.readouterr().out
            assert "revisitop1m: 2 archive(s) done now, 0 already done, 4 images" in out
            assert "FAILED (1)" in out and "revisitop1m.2.tar.gz" in out and "corrupt" in out
            # fetched 3 times (the task's attempts), deleted every time, nothing extracted
            assert srv.hits("jpg/revisitop1m.2.tar.gz") == 3
            assert not any((tmp_path / "jpg" / n).exists() for n in images if n[:2] == "02")
            assert not (tmp_path / "archives" / "revisitop1m.2.tar.gz").exists()
            assert not list(tmp_path.glob(".extract-*"))
            assert archive_name(2) not in read_json(tmp_path / "manifest.json")["archives"]
            # the mirror is fixed: the rerun fetches only that archive
            srv.add_file("jpg/revisitop1m.2.tar.gz", good)
            assert cli_main(argv) == 0
            out = capsys.readouterr().out
            assert "1 archive(s) done now, 2 already done, 2 images extracted; 6 of the 200" in out
            assert srv.hits("jpg/revisitop1m.1.tar.gz") == 1
            check_images(tmp_path, {n: v for n, v in images.items() if n[:2] in ("01", "02", "03")})

    @pytest.mark.slow
    def test_killed_run_resumes(self, tmp_path: Path) -> None:
        # 200 kB archives (the client writes 64 kB blocks), ~0.8 s each
        files, images = revisitop1m_mirror(n_archives=4, per_archive=2, image_bytes=100_000)
        with FaultServer(files) as srv:
            srv.add_fault("jpg/*.tar.gz", Fault(rate=250_000, times=None))
            cmd = [sys.executable, "-m", "gldboxes", "-q", "retrieval", "download"]
            cmd += ["revisitop1m", "--out", str(tmp_path), "--archives", "1-4"]
            cmd += ["--base-url", srv.base_url, "--no-progress"]
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            deadline = time.time() + 60
            part = tmp_path / "archives" / "revisitop1m.2.tar.gz.part"
            while time.time() < deadline and proc.poll() is None:
                done = (tmp_path / "shards" / "archive-001" / "done.json").exists()
                if done and part.exists() and part.stat().st_size >= 1 << 16:
                    break
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert (tmp_path / "shards" / "archive-001" / "done.json").exists()
            assert not (tmp_path / "shards" / "archive-002").exists(), "killed too late"
            have = part.stat().st_size
            assert 1 << 16 <= have < len(files["jpg/revisitop1m.2.tar.gz"])
            srv.clear_faults()
            rep = download_revisitop1m(
                tmp_path,
                archives="1-4",
                base_url=srv.base_url,
                executor=SerialExecutor(progress=False),
                **NET,
            )
            assert rep.ok and rep.skipped == [archive_name(1)] and rep.images == 6
            assert srv.hits("jpg/revisitop1m.1.tar.gz") == 1  # not fetched again
            assert srv.requests("jpg/revisitop1m.2.tar.gz")[-1].range_start == have
            check_images(tmp_path, images)
            assert rep.present == 8 and rep.listed == 8


# ------------------------------------------------------------------------ distractor runs
CONF: dict[str, Any] = {"codebook": {"size": 64, "niter": 10}, "kernel": "asmk_star"}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny world (benchmark, codebook images) and another world's photos: distractors."""
    from gldboxes.synth import confs, generate_world

    world = generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])
    other = generate_world(
        tmp_path_factory.mktemp("other"), dataclasses.replace(confs["tiny"], seed=7)
    )
    return world, other / "retrieval" / "jpg"


@pytest.fixture(scope="module")
def runs(worlds: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from retrieval.runner.run import run

    world, dis = worlds
    out = tmp_path_factory.mktemp("runs")
    kw: dict[str, Any] = {"codebook_images": world / "train" / "images"}
    plain = run(world / "retrieval", out, CONF, **kw)
    with_d = run(world / "retrieval", out, CONF, distractors=dis, shard_size=20, **kw)
    return {"out": out, "plain": plain, "dis": with_d}


@pytest.mark.slow
class TestRunWithDistractors:
    def test_real_case(self, worlds: tuple[Path, Path], runs: dict[str, Any]) -> None:
        world, dis = worlds
        ds = RevisitedDataset.load(world / "retrieval")
        n_db, n_dis = ds.n_db, len(list(dis.glob("*.jpg")))
        plain, with_d = runs["plain"], runs["dis"]
        a, b = np.load(plain.ranks), np.load(with_d.ranks)
        assert a.shape == (n_db, ds.n_queries) and b.shape == (n_db + n_dis, ds.n_queries)
        for col in b.T:  # every image ranked once, distractors under ids n_db ..
            assert sorted(col.tolist()) == list(range(n_db + n_dis))
        # The ranking restricted to the benchmark's images is the plain run's ranking.
        restricted = np.stack([col[col < n_db] for col in b.T], axis=1)
        np.testing.assert_array_equal(restricted, a)
        # Distractors reach the heads of the rankings (the other world's facades look alike).
        assert int((b[:10] >= n_db).sum()) >= 5
        # Distractors only ever push positives down: no protocol's mAP, no query's AP rises,
        # and here they cost mAP on Medium and Hard.
        for p in ("easy", "medium", "hard"):
            r0, r1 = plain.results[p], with_d.results[p]
            assert np.all(np.asarray(r1.aps) <= np.asarray(r0.aps) + 1e-12)
            assert r1.map <= r0.map
        assert with_d.results["hard"].map < plain.results["hard"].map - 0.05
        # Distractors are negatives: ids outside every ground-truth list, as revisitop scores.
        reference = evaluate_protocols(b, ds.gnd, n_db=None)
        assert reference["medium"].map == pytest.approx(with_d.results["medium"].map)
        # Names: the table row and metrics.json say <dataset>+<count>.
        assert f"-synth+{n_dis} |" in with_d.table()
        metrics = read_json(with_d.metrics_path)
        assert metrics["dataset"] == f"synth+{n_dis}" and metrics["distractors"] == n_dis
        assert with_d.ranks.parent.name.startswith(plain.ranks.parent.name + f"+{n_dis}-")
        # The distractor index: parts of 20 images, after the benchmark's ids.
        idx = next((runs["out"] / "index").glob("*-jpg-*.parts"))
        header = read_json(idx / "sharded.json")
        assert [e["n_images"] for e in header["parts"]] == [20, 20, n_dis - 40]
        assert header["meta"]["distractors"]["kernel"] == "asmk_star"

    def test_index_reused_and_checked(
        self,
        worlds: tuple[Path, Path],
        runs: dict[str, Any],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from retrieval.runner.run import run

        world, _ = worlds
        idx = next((runs["out"] / "index").glob("*-jpg-*.parts"))
        cb = runs["plain"].codebook
        # the distractor index serves another run with the same codebook: same ranks
        res = run(world / "retrieval", tmp_path, CONF, codebook_path=cb, distractors=idx)
        assert res.ranks.read_bytes() == runs["dis"].ranks.read_bytes()
        # ... and is refused by a run with another codebook or kernel (one line, exit 2)
        other = tmp_path / "cb.npy"
        np.save(other, np.load(cb)[::-1].copy())
        base = ["retrieval", "run", "--dataset", str(world / "retrieval"), "--out", str(tmp_path)]
        assert cli_main([*base, "--codebook", str(other), "--distractors", str(idx)]) == 2
        err = capsys.readouterr().err
        assert "sharded.json was built with codebook_md5=" in err
        argv = [*base, "--codebook", str(cb), "--kernel", "vlad", "--distractors", str(idx)]
        assert cli_main(argv) == 2
        assert "built with kernel='asmk_star', this run uses 'vlad'" in capsys.readouterr().err
        # options distractors do not support are refused before any work
        argv = [*base, "--codebook", str(cb), "--distractors", str(idx), "--verify"]
        assert cli_main(argv) == 2
        assert "--verify" in capsys.readouterr().err
        argv = [*base, "--codebook", str(cb), "--distractors", str(idx), "--regions", "gt"]
        assert cli_main(argv) == 2
        assert "--regions" in capsys.readouterr().err
        assert cli_main([*base, "--codebook", str(cb), "--distractors", str(tmp_path / "x")]) == 2
        assert "folder not found" in capsys.readouterr().err

    def test_cli_engine_serial_same_bytes(
        self,
        worlds: tuple[Path, Path],
        runs: dict[str, Any],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        world, dis = worlds
        argv = ["-q", "retrieval", "run", "--dataset", str(world / "retrieval")]
        argv += ["--out", str(tmp_path), "--codebook", str(runs["plain"].codebook)]
        argv += ["--distractors", str(dis), "--engine", "serial", "--shard-size", "16"]
        assert cli_main(argv) == 0
        out = capsys.readouterr().out
        n_dis = len(list(dis.glob("*.jpg")))
        assert f"-synth+{n_dis} | 100.00 |" in out
        assert f"({n_dis} images in 4 parts, " in out  # 54 distractors, 16 a part
        ranks = list(tmp_path.glob(f"results/*-synth+{n_dis}-*/ranks.npy"))
        assert len(ranks) == 1
        assert ranks[0].read_bytes() == runs["dis"].ranks.read_bytes()
        assert (
            read_json(ranks[0].parent / "metrics.json")["metrics"]
            == (read_json(runs["dis"].metrics_path)["metrics"])
        )


@pytest.mark.slow
@pytest.mark.server
def test_ray_same_bytes(
    worlds: tuple[Path, Path],
    runs: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--engine ray``: the download and the run with distractors give the serial bytes."""
    world, dis = worlds
    files, images = revisitop1m_mirror(n_archives=3)
    engine = ["--engine", "ray", "--num-cpus", "2", "--task-cpus", "0.5", "--no-progress"]
    with FaultServer(files) as srv:
        argv = ["-q", "retrieval", "download", "revisitop1m", "--out", str(tmp_path / "r1m")]
        argv += ["--base-url", srv.base_url, "--archives", "1-3", "--timeout", "5"]
        srv.add_fault("jpg/revisitop1m.2.tar.gz", Fault(corrupt=True))  # refetched by Ray
        assert cli_main([*argv, *engine]) == 0
    check_images(tmp_path / "r1m", images)
    done = read_done(tmp_path / "r1m" / "shards" / "archive-002")
    assert done is not None and done["pid"] != os.getpid()  # ran in a Ray worker
    manifest = read_json(tmp_path / "r1m" / "manifest.json")["archives"]
    assert [manifest[archive_name(i)]["images"] for i in (1, 2, 3)] == [2, 2, 2]
    argv = ["-q", "retrieval", "run", "--dataset", str(world / "retrieval"), "--json"]
    argv += ["--out", str(tmp_path / "out"), "--codebook", str(runs["plain"].codebook)]
    argv += ["--distractors", str(dis), "--shard-size", "16", *engine[:-1]]
    capsys.readouterr()
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["distractors"].endswith(".parts") and summary["mAP"]["easy"] == 1.0
    ranks = list((tmp_path / "out").glob("results/*+*/ranks.npy"))
    assert len(ranks) == 1 and ranks[0].read_bytes() == runs["dis"].ranks.read_bytes()
    summary = json.loads((ranks[0].parent / "metrics.json").read_text())
    assert summary["dataset"].startswith("synth+")
