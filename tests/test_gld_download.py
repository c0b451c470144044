"""GLDv2 shard and URL-list downloaders against a local fault-injecting HTTP server."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from fault_server import Fault, FaultServer

from gldboxes.cli.main import main as cli_main
from gldboxes.executor import read_done
from gldboxes.gld import (
    GLDV2_METADATA,
    download_gldv2,
    extract_shard,
    image_relpath,
    parse_md5_file,
    parse_shard_spec,
)
from gldboxes.gld_urls import download_url_list
from gldboxes.http import DownloadError, download_file, fetch_bytes
from gldboxes.io import read_json

REPO = Path(__file__).resolve().parents[1]
FAST: dict[str, Any] = {"retries": 3, "backoff": 0.02, "timeout": 2.0, "progress": False}

pytestmark = pytest.mark.server


# ----------------------------------------------------------------------------- test mirror
def make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gldv2_mirror(
    split: str = "train",
    n_shards: int = 3,
    per_shard: int = 4,
    image_bytes: int = 3000,
    seed: int = 0,
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Files of a GLDv2-layout mirror and the images {relpath: bytes} its shards hold."""
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    images: dict[str, bytes] = {}
    for s in range(n_shards):
        members = {}
        for _ in range(per_shard):
            image_id = "".join(rng.choice(list("0123456789abcdef"), 16))
            members[image_relpath(image_id)] = rng.bytes(image_bytes)
        images.update(members)
        tar = make_tar(members)
        name = f"images_{s:03d}.tar"
        files[f"{split}/{name}"] = tar
        files[f"md5sum/{split}/md5.images_{s:03d}.txt"] = (
            f"{hashlib.md5(tar).hexdigest()}  {name}\n".encode()
        )
    for rel in GLDV2_METADATA[split]:
        files[rel] = f"id,landmark_id\n# {rel}\n".encode()
    return files, images


def check_images(root: Path, images: dict[str, bytes]) -> None:
    for rel, data in images.items():
        assert (root / "images" / rel).read_bytes() == data, rel


def images_of_shard(files: dict[str, bytes], split: str, index: int) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(files[f"{split}/images_{index:03d}.tar"])) as tf:
        return tf.getnames()


Mirror = tuple[FaultServer, dict[str, bytes], dict[str, bytes]]


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    files, images = gldv2_mirror()
    with FaultServer(files) as srv:
        yield srv, files, images


# ----------------------------------------------------------------------------- fault server
class TestFaultServer:
    def test_range_faults_and_restart(self) -> None:
        data = bytes(range(256)) * 40
        with FaultServer({"f.bin": data}) as srv:
            r = requests.get(srv.url("f.bin"), headers={"Range": "bytes=100-"}, timeout=5)
            assert r.status_code == 206 and r.content == data[100:]
            assert r.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
            r = requests.get(srv.url("f.bin"), headers={"Range": "bytes=5-9"}, timeout=5)
            assert r.content == data[5:10]
            r = requests.get(srv.url("f.bin"), headers={"Range": f"bytes={len(data)}-"}, timeout=5)
            assert r.status_code == 416
            assert requests.get(srv.url("nope"), timeout=5).status_code == 404
            srv.add_fault("f.*", Fault(status=503, times=1))
            assert requests.get(srv.url("f.bin"), timeout=5).status_code == 503
            assert requests.get(srv.url("f.bin"), timeout=5).content == data
            srv.add_fault("f.bin", Fault(drop_after=1000))
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                requests.get(srv.url("f.bin"), timeout=5).content  # noqa: B018
            assert srv.requests("f.bin")[-1].bytes_sent == 1000
            srv.add_fault("f.bin", Fault(corrupt=True))
            assert requests.get(srv.url("f.bin"), timeout=5).content == bytes(255 - b for b in data)
            assert srv.hits("f.bin") == 7
            port = srv.port
            srv.stop()
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(f"http://127.0.0.1:{port}/f.bin", timeout=2)
            srv.start()
            assert srv.port == port
            assert requests.get(srv.url("f.bin"), timeout=5).content == data


# ----------------------------------------------------------------------------- http helpers
class TestHttp:
    def test_resume_when_server_ignores_range(self, tmp_path: Path) -> None:
        data = os.urandom(50_000)
        md5 = hashlib.md5(data).hexdigest()
        with FaultServer({"x": data}) as srv:
            srv.add_fault("x", Fault(drop_after=20_000))
            srv.add_fault("x", Fault(ignore_range=True))  # the resume gets a full 200 answer
            out = download_file(srv.url("x"), tmp_path / "x", md5=md5, retries=3, backoff=0.01)
            assert out.read_bytes() == data
            assert [r.status for r in srv.requests("x")] == [200, 200]
            assert not (tmp_path / "x.part").exists()

    def test_stale_part_and_permanent_errors(self, tmp_path: Path) -> None:
        data = os.urandom(10_000)
        with FaultServer({"x": data}) as srv:
            # a stale .part longer than the file: 416, restart from scratch
            (tmp_path / "x.part").write_bytes(os.urandom(20_000))
            download_file(
                srv.url("x"),
                tmp_path / "x",
                md5=hashlib.md5(data).hexdigest(),
                retries=2,
                backoff=0.01,
            )
            assert (tmp_path / "x").read_bytes() == data
            with pytest.raises(DownloadError) as err:
                download_file(srv.url("missing"), tmp_path / "m", retries=3, backoff=0.01)
            assert err.value.status == 404 and srv.hits("missing") == 1  # 404 is not retried
            srv.add_fault("x", Fault(status=500, times=None))
            with pytest.raises(DownloadError, match="failed after 3 attempts"):
                fetch_bytes(srv.url("x"), retries=2, backoff=0.01)
            srv.clear_faults()
            with pytest.raises(DownloadError, match="larger than"):
                fetch_bytes(srv.url("x"), max_bytes=100)


# ----------------------------------------------------------------------------- helpers
class TestHelpers:
    def test_parse_shard_spec(self) -> None:
        assert parse_shard_spec("0-2,7,5-5", 10) == [0, 1, 2, 5, 7]
        assert parse_shard_spec(None, 3) == [0, 1, 2]
        with pytest.raises(ValueError, match="out of range"):
            parse_shard_spec("0-20", 20)
        with pytest.raises(ValueError, match="not N or N-M"):
            parse_shard_spec("1..3", 20)

    def test_parse_md5_file(self) -> None:
        h = "0123456789abcdef0123456789abcdef"
        assert parse_md5_file(f"{h}  images_007.tar\n", "images_007.tar") == h
        assert parse_md5_file(f"{h.upper()} *images_007.tar", "images_007.tar") == h
        with pytest.raises(ValueError, match=r"no md5 for images_008\.tar"):
            parse_md5_file(f"{h}  images_007.tar\n", "images_008.tar")
        with pytest.raises(ValueError, match="no md5"):
            parse_md5_file("<html>AccessDenied</html>", "images_000.tar")

    def test_extract_rejects_unsafe_members(self, tmp_path: Path) -> None:
        tar = tmp_path / "evil.tar"
        tar.write_bytes(make_tar({"a/b/c/abc0.jpg": b"ok", "../escape.jpg": b"x"}))
        with pytest.raises(ValueError, match="unsafe member name"):
            extract_shard(tar, tmp_path / "images")
        assert not (tmp_path / "escape.jpg").exists()
        assert not (tmp_path / "images" / "a/b/c/abc0.jpg").exists()  # nothing half-extracted
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            link = tarfile.TarInfo("a/b/c/link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(link)
        tar.write_bytes(buf.getvalue())
        with pytest.raises(ValueError, match="not a regular file"):
            extract_shard(tar, tmp_path / "images")
        tar.write_bytes(make_tar({"a/b/c/abc1.jpg": os.urandom(5000)})[:3000])  # truncated
        with pytest.raises(ValueError, match="not a readable tar"):
            extract_shard(tar, tmp_path / "images")
        assert not list((tmp_path / "images").rglob("*.jpg"))


# ----------------------------------------------------------------------------- GLDv2 shards
class TestGLDv2:
    def test_smoke_and_second_run_skips(self, tmp_path: Path, mirror: Mirror) -> None:
        srv, files, images = mirror
        rep = download_gldv2(
            "train", tmp_path, shards="0-2", base_url=srv.base_url, workers=2, **FAST
        )
        root = tmp_path / "train"
        assert rep.ok and rep.done == ["images_000.tar", "images_001.tar", "images_002.tar"]
        assert rep.images == 12
        check_images(root, images)
        assert len(list((root / "images").rglob("*.jpg"))) == 12
        assert not list((root / "tars").glob("*"))  # tars removed after extraction
        assert (root / "train.csv").read_bytes() == files["metadata/train.csv"]
        man = read_json(root / "manifest.json")
        assert man["format_version"] == 1 and man["split"] == "train"
        assert all(man["shards"][f"images_00{i}.tar"]["extracted"] for i in range(3))
        assert man["shards"]["images_001.tar"]["images"] == 4
        hits = srv.hits("train/*.tar")
        rep2 = download_gldv2("train", tmp_path, shards="0-2", base_url=srv.base_url, **FAST)
        assert rep2.ok and rep2.skipped == rep.done and rep2.done == []
        assert srv.hits("train/*.tar") == hits == 3

    def test_500s_are_retried(self, tmp_path: Path, mirror: Mirror) -> None:
        srv, _, images = mirror
        srv.add_fault("train/images_000.tar", Fault(status=500, times=2))
        srv.add_fault("md5sum/train/md5.images_001.txt", Fault(status=503, times=1))
        rep = download_gldv2("train", tmp_path, shards="0-2", base_url=srv.base_url, **FAST)
        assert rep.ok
        assert srv.hits("train/images_000.tar") == 3
        assert srv.hits("md5sum/train/md5.images_001.txt") == 2
        check_images(tmp_path / "train", images)

    def test_dropped_connection_resumes_with_range(self, tmp_path: Path, mirror: Mirror) -> None:
        srv, files, images = mirror
        size = len(files["train/images_001.tar"])
        srv.add_fault("train/images_001.tar", Fault(drop_after=5000, times=1))
        rep = download_gldv2(
            "train", tmp_path, shards=[1], base_url=srv.base_url, metadata=False, **FAST
        )
        assert rep.ok
        reqs = srv.requests("train/images_001.tar")
        assert [(r.status, r.range_start, r.bytes_sent) for r in reqs] == [
            (200, None, 5000),
            (206, 5000, size - 5000),
        ]  # no byte fetched twice
        check_images(tmp_path / "train", {k: images[k] for k in images_of_shard(files, "train", 1)})

    def test_wrong_md5_once_is_refetched(self, tmp_path: Path, mirror: Mirror) -> None:
        srv, files, images = mirror
        srv.add_fault("train/images_002.tar", Fault(corrupt=True, times=1))
        rep = download_gldv2(
            "train", tmp_path, shards=[2], base_url=srv.base_url, metadata=False, **FAST
        )
        assert rep.ok and srv.hits("train/images_002.tar") == 2
        check_images(tmp_path / "train", {k: images[k] for k in images_of_shard(files, "train", 2)})

    def test_md5_list_fixed_on_the_mirror_is_refetched(
        self, tmp_path: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]
    ) -> None:
        srv, files, images = mirror
        md5_rel = "md5sum/train/md5.images_000.txt"
        srv.add_file(md5_rel, b"0123456789abcdef0123456789abcdef  images_000.tar\n")  # wrong
        argv = ["-q", "download", "gldv2", "--split", "train", "--out", str(tmp_path)]
        argv += ["--shards", "0", "--base-url", srv.base_url, "--no-metadata", "--no-progress"]
        argv += ["--retries", "1", "--backoff", "0.01"]
        assert cli_main(argv) == 1
        assert "images_000.tar: " in capsys.readouterr().out
        # the list was asked again once, on the first mismatch (still wrong then)
        assert srv.hits(md5_rel) == 2 and srv.hits("train/images_000.tar") == 2
        # The mirror fixes its md5 list: the cached wrong copy must not fail the shard forever.
        srv.add_file(md5_rel, files[md5_rel])
        assert cli_main(argv) == 0
        assert "1 shard(s) done now" in capsys.readouterr().out
        assert srv.hits("train/images_000.tar") == 3  # matched the refetched md5: kept at once
        assert srv.hits(md5_rel) == 3
        root = tmp_path / "train"
        assert (root / "md5" / "md5.images_000.txt").read_bytes() == files[md5_rel]
        man = read_json(root / "manifest.json")
        assert (
            man["shards"]["images_000.tar"]["md5"]
            == hashlib.md5(files["train/images_000.tar"]).hexdigest()
        )
        check_images(root, {k: images[k] for k in images_of_shard(files, "train", 0)})

    def test_bad_shard_is_never_extracted_and_named(
        self, tmp_path: Path, mirror: Mirror, capsys: pytest.CaptureFixture[str]
    ) -> None:
        srv, files, _ = mirror
        srv.add_fault("train/images_001.tar", Fault(corrupt=True, times=None))
        srv.remove_file("md5sum/train/md5.images_002.txt")
        code = cli_main(
            [
                "-q",
                "download",
                "gldv2",
                "--split",
                "train",
                "--out",
                str(tmp_path),
                "--shards",
                "0-2",
                "--base-url",
                srv.base_url,
                "--retries",
                "2",
                "--backoff",
                "0.01",
                "--no-progress",
            ]
        )
        out = capsys.readouterr().out
        assert code == 1
        assert "FAILED (2): images_001.tar, images_002.tar" in out
        assert "md5 mismatch" in out and "HTTP 404" in out
        assert srv.hits("train/images_001.tar") == 3  # fetched, refetched, refetched
        root = tmp_path / "train"
        man = read_json(root / "manifest.json")
        assert set(man["shards"]) == {"images_000.tar"}
        extracted = {str(p.relative_to(root / "images")) for p in (root / "images").rglob("*.jpg")}
        assert extracted == set(images_of_shard(files, "train", 0))
        assert not (root / "tars" / "images_001.tar").exists()  # only ever as .part

    def test_slow_response_times_out_and_retries(self, tmp_path: Path, mirror: Mirror) -> None:
        srv, _, _ = mirror
        srv.add_fault("train/images_000.tar", Fault(delay=1.0, times=1))
        t0 = time.perf_counter()
        rep = download_gldv2(
            "train",
            tmp_path,
            shards=[0],
            base_url=srv.base_url,
            metadata=False,
            retries=2,
            backoff=0.01,
            timeout=0.3,
            progress=False,
        )
        assert rep.ok and srv.hits("train/images_000.tar") == 2
        assert time.perf_counter() - t0 < 5

    def test_server_stops_then_resume(self, tmp_path: Path) -> None:
        files, images = gldv2_mirror(per_shard=4, image_bytes=6000, seed=1)
        with FaultServer(files) as srv:
            srv.add_fault("train/*.tar", Fault(rate=40_000, times=None))  # ~0.6 s a shard
            threading.Timer(0.3, srv.stop).start()
            rep = download_gldv2(
                "train",
                tmp_path,
                shards="0-2",
                base_url=srv.base_url,
                metadata=False,
                workers=3,
                retries=1,
                backoff=0.05,
                timeout=1.0,
                progress=False,
            )
            assert set(rep.failed) == {"images_000.tar", "images_001.tar", "images_002.tar"}
            root = tmp_path / "train"
            assert (
                not (root / "manifest.json").exists()
                or not read_json(root / "manifest.json")["shards"]
            )
            assert not (root / "images").exists() or not list((root / "images").rglob("*.jpg"))
            parts = list((root / "tars").glob("*.part"))
            assert parts and all(0 < p.stat().st_size < 30_000 for p in parts)
            srv.clear_faults()
            srv.start()
            rep = download_gldv2(
                "train", tmp_path, shards="0-2", base_url=srv.base_url, metadata=False, **FAST
            )
            assert rep.ok and len(rep.done) == 3
            check_images(root, images)
            resumed = [r for r in srv.requests("train/*.tar") if r.range_start]
            assert len(resumed) == len(parts)

    @pytest.mark.slow
    def test_killed_run_resumes_without_refetching(self, tmp_path: Path) -> None:
        files, images = gldv2_mirror(n_shards=4, per_shard=4, image_bytes=5000, seed=2)
        with FaultServer(files) as srv:
            srv.add_fault("train/*.tar", Fault(rate=30_000, times=None))  # ~0.7 s a shard
            cmd = [
                sys.executable,
                "-m",
                "gldboxes",
                "-q",
                "download",
                "gldv2",
                "--split",
                "train",
                "--out",
                str(tmp_path),
                "--shards",
                "0-3",
                "--base-url",
                srv.base_url,
                "--workers",
                "1",
                "--no-metadata",
                "--no-progress",
            ]
            proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            manifest = tmp_path / "train" / "manifest.json"
            deadline = time.time() + 60
            done: list[str] = []
            while time.time() < deadline and proc.poll() is None:
                if manifest.exists():
                    done = [
                        k for k, v in read_json(manifest)["shards"].items() if v.get("extracted")
                    ]
                    if done:
                        break
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert 1 <= len(done) < 4, "the run was not killed mid-way"
            done = [k for k, v in read_json(manifest)["shards"].items() if v.get("extracted")]
            before = {name: srv.hits(f"train/{name}") for name in done}
            srv.clear_faults()
            rep = download_gldv2(
                "train", tmp_path, shards="0-3", base_url=srv.base_url, metadata=False, **FAST
            )
            assert rep.ok and sorted(rep.skipped) == sorted(done)
            assert {name: srv.hits(f"train/{name}") for name in done} == before
            check_images(tmp_path / "train", images)
            assert not list((tmp_path / "train" / "images").glob(".extract-*"))

    def test_no_extract_then_extract(self, tmp_path: Path, mirror: Mirror) -> None:
        srv, _, images = mirror
        rep = download_gldv2(
            "train",
            tmp_path,
            shards="0-2",
            base_url=srv.base_url,
            metadata=False,
            extract=False,
            **FAST,
        )
        assert rep.ok and len(list((tmp_path / "train" / "tars").glob("*.tar"))) == 3
        assert not (tmp_path / "train" / "images").exists()
        hits = srv.hits("train/*.tar")
        rep = download_gldv2(
            "train",
            tmp_path,
            shards="0-2",
            base_url=srv.base_url,
            metadata=False,
            keep_tars=True,
            **FAST,
        )
        assert rep.ok and rep.images == 12 and srv.hits("train/*.tar") == hits
        check_images(tmp_path / "train", images)
        assert len(list((tmp_path / "train" / "tars").glob("*.tar"))) == 3


# ----------------------------------------------------------------------------- URL lists
def jpeg(seed: int, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


class TestUrlList:
    def _setup(self, tmp_path: Path) -> tuple[dict[str, bytes], list[tuple[str, str]]]:
        files = {f"img/{i}.jpg": jpeg(i) for i in range(10)}
        _, png = cv2.imencode(".png", np.full((30, 20, 3), 200, np.uint8))
        files["img/p.png"] = png.tobytes()
        files["img/html.jpg"] = b"<html>moved</html>"
        return files, []

    def _csv(self, tmp_path: Path, srv: FaultServer, names: list[str]) -> Path:
        path = tmp_path / "train.csv"
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "url", "landmark_id"])
            for k, name in enumerate(names):
                w.writerow([f"{k:016x}", srv.url(f"img/{name}"), 7])
            w.writerow(["fff0000000000000", "None", 7])
        return path

    def test_download_failures_and_resume(self, tmp_path: Path) -> None:
        files, _ = self._setup(tmp_path)
        names = [f"{i}.jpg" for i in range(10)] + ["p.png", "html.jpg", "gone.jpg"]
        with FaultServer(files) as srv:
            srv.add_fault("img/0.jpg", Fault(status=500, times=1))
            srv.add_fault("img/1.jpg", Fault(drop_after=300, times=1))
            srv.add_fault("img/2.jpg", Fault(status=502, times=None))
            path = self._csv(tmp_path, srv, names)
            out = tmp_path / "out"
            rep = download_url_list(
                path,
                out,
                workers=4,
                max_size=32,
                retries=2,
                backoff=0.01,
                timeout=2,
                progress=False,
            )
            assert (rep.downloaded, rep.failed, rep.present) == (10, 4, 0)
            ids = {
                row["url"].rsplit("/", 1)[1]: row["id"]
                for row in csv.DictReader(open(path))
                if row["url"] != "None"
            }
            for i in (0, 1, 3, 9):
                img = cv2.imread(str(out / "images" / image_relpath(ids[f"{i}.jpg"])))
                assert img is not None and max(img.shape[:2]) == 32
            png = cv2.imread(str(out / "images" / image_relpath(ids["p.png"])))
            assert png is not None and png.shape[:2] == (30, 20)  # small images are not upscaled
            fails = {r["id"]: r for r in csv.DictReader(open(out / "failures.csv"))}
            assert set(fails) == {
                ids["2.jpg"],
                ids["html.jpg"],
                ids["gone.jpg"],
                "fff0000000000000",
            }
            assert "HTTP 502" in fails[ids["2.jpg"]]["reason"]
            assert "not a decodable image" in fails[ids["html.jpg"]]["reason"]
            assert "HTTP 404" in fails[ids["gone.jpg"]]["reason"]
            assert fails["fff0000000000000"]["reason"] == "no url"
            assert srv.hits("img/2.jpg") == 3 and srv.hits("img/gone.jpg") == 1
            assert not list(out.rglob("*.tmp"))

            # resume: present images are not fetched again; failures are retried ...
            srv.clear_faults()
            before = srv.hits("img/*")
            rep = download_url_list(path, out, workers=4, max_size=32, retries=0, progress=False)
            assert (rep.present, rep.downloaded, rep.failed) == (10, 1, 3)
            assert srv.hits("img/*") - before == 3  # 2.jpg, html.jpg, gone.jpg
            left = {r["id"] for r in csv.DictReader(open(out / "failures.csv"))}
            assert ids["2.jpg"] not in left and ids["gone.jpg"] in left
            # ... unless told to skip them
            before = srv.hits("img/*")
            rep = download_url_list(path, out, retry_failed=False, progress=False)
            assert srv.hits("img/*") == before and rep.skipped_failed == 3

    def test_reencoding_keeps_pixels(self, tmp_path: Path) -> None:
        data = jpeg(5, 80, 60)
        with FaultServer({"img/a.jpg": data}) as srv:
            path = tmp_path / "l.csv"
            path.write_text(f"id,url\nabcdef0123456789,{srv.url('img/a.jpg')}\n")
            rep = download_url_list(path, tmp_path / "o", quality=95, progress=False)
            assert rep.downloaded == 1
            got = cv2.imread(str(tmp_path / "o/images/a/b/c/abcdef0123456789.jpg"))
            ref = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            assert got is not None and ref is not None and got.shape == ref.shape
            assert np.abs(got.astype(int) - ref.astype(int)).mean() < 3.0

    def test_16bit_png_keeps_its_values(self, tmp_path: Path) -> None:
        ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
        ok, png = cv2.imencode(".png", ramp)
        assert ok
        with FaultServer({"img/deep.png": png.tobytes()}) as srv:
            path = tmp_path / "l.csv"
            path.write_text(f"id,url\nabcdef0123456789,{srv.url('img/deep.png')}\n")
            rep = download_url_list(path, tmp_path / "o", quality=95, progress=False)
        assert rep.downloaded == 1 and rep.failed == 0
        got = cv2.imread(
            str(tmp_path / "o/images/a/b/c/abcdef0123456789.jpg"), cv2.IMREAD_GRAYSCALE
        )
        assert got is not None and got.shape == (48, 64)
        want = np.rint(ramp / 257.0)  # 16-bit range onto 8 bits
        assert np.abs(got.astype(float) - want).mean() < 2.0  # not white: the ramp survives
        assert got[0, 0] < 10 and got[-1, -1] > 245

    def test_bad_rows_are_failures_and_the_rest_downloads(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        files = {f"img/{i}.jpg": jpeg(i) for i in range(3)}
        with FaultServer(files) as srv:
            path = tmp_path / "l.csv"
            path.write_text(
                "id,url,landmark_id\n"
                f"aaaa000000000000,{srv.url('img/0.jpg')},1\n"
                f"../../etc/passwd,{srv.url('img/1.jpg')},1\n"  # unsafe id
                f"ab,{srv.url('img/1.jpg')},1\n"  # too short for a/b/c/<id>.jpg
                "cccc000000000000\n"  # no url field
                f"bbbb000000000000,{srv.url('img/2.jpg')},1\n"
            )
            argv = ["-q", "download", "urls", "--csv", str(path), "--out", str(tmp_path / "o")]
            argv += ["--no-progress"]
            for _ in range(2):  # a rerun does not stop at the bad rows either
                assert cli_main(argv) == 0
                assert "3 failed" in capsys.readouterr().out
                fails = {r["id"]: r for r in csv.DictReader(open(tmp_path / "o/failures.csv"))}
                assert set(fails) == {"../../etc/passwd", "ab", "cccc000000000000"}
                assert "cannot be laid out" in fails["ab"]["reason"]
                assert "cannot be laid out" in fails["../../etc/passwd"]["reason"]
                assert "line 5: expected 3 fields, got 1" in fails["cccc000000000000"]["reason"]
                for image_id in ("aaaa000000000000", "bbbb000000000000"):
                    assert (tmp_path / "o/images" / image_relpath(image_id)).exists()
            assert srv.hits("img/1.jpg") == 0
        assert not (tmp_path / "etc").exists() and not (tmp_path / "o/etc").exists()

    def test_utf8_bom_header(self, tmp_path: Path) -> None:
        with FaultServer({"img/a.jpg": jpeg(1)}) as srv:
            path = tmp_path / "l.csv"
            path.write_text(f"id,url\nabcdef0123456789,{srv.url('img/a.jpg')}\n", "utf-8-sig")
            assert path.read_bytes().startswith(b"\xef\xbb\xbfid,url")
            rep = download_url_list(path, tmp_path / "o", progress=False)
        assert rep.downloaded == 1
        assert (tmp_path / "o/images/a/b/c/abcdef0123456789.jpg").exists()

    def test_duplicate_ids_are_reported(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        files = {f"img/{i}.jpg": jpeg(i) for i in range(4)}
        with FaultServer(files) as srv:
            path = tmp_path / "l.csv"
            path.write_text(
                "id,url\n"
                f"aaaa000000000000,{srv.url('img/0.jpg')}\n"
                f"bbbb000000000000,{srv.url('img/1.jpg')}\n"
                f"aaaa000000000000,{srv.url('img/2.jpg')}\n"
                f"aaaa000000000000,{srv.url('img/3.jpg')}\n"
            )
            argv = ["download", "urls", "--csv", str(path), "--out", str(tmp_path / "o")]
            argv += ["--quality", "95"]
            assert cli_main([*argv, "--no-progress"]) == 0
            said = capsys.readouterr()
            assert "2 downloaded, 0 already present, 0 failed" in said.out
            assert "2 row(s) repeating an earlier id skipped" in said.out
            assert "2 row(s) repeat an earlier id" in said.err  # the warning
            assert srv.hits("img/2.jpg") == srv.hits("img/3.jpg") == 0
            got = (tmp_path / "o/images" / image_relpath("aaaa000000000000")).read_bytes()
            ref = cv2.imdecode(np.frombuffer(files["img/0.jpg"], np.uint8), cv2.IMREAD_COLOR)
            img = cv2.imdecode(np.frombuffer(got, np.uint8), cv2.IMREAD_COLOR)
            assert np.abs(img.astype(int) - ref.astype(int)).mean() < 3.0  # the first row won
            rows = list(csv.DictReader(open(tmp_path / "o/failures.csv")))
            want = [
                {"id": "aaaa000000000000", "url": srv.url(f"img/{i}.jpg"), "reason": "duplicate id"}
                for i in (2, 3)
            ]
            assert rows == want
            # A rerun lists them once again (not twice) and fetches nothing.
            hits = srv.hits("img/*")
            assert cli_main([*argv, "--no-progress"]) == 0
            assert list(csv.DictReader(open(tmp_path / "o/failures.csv"))) == want
            assert srv.hits("img/*") == hits

    def test_bad_csv(self, tmp_path: Path) -> None:
        path = tmp_path / "x.csv"
        path.write_text("image,link\n")
        with pytest.raises(ValueError, match=r"x\.csv: expected a header with 'id' and 'url'"):
            download_url_list(path, tmp_path / "o", progress=False)


def test_cli_urls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FaultServer({"img/a.jpg": jpeg(1)}) as srv:
        path = tmp_path / "l.csv"
        path.write_text(
            f"id,url,landmark_id\nabcdef0123456789,{srv.url('img/a.jpg')},1\n"
            f"bbcdef0123456789,{srv.url('img/dead.jpg')},1\n"
        )
        code = cli_main(
            [
                "-q",
                "download",
                "urls",
                "--csv",
                str(path),
                "--out",
                str(tmp_path / "o"),
                "--max-size",
                "16",
                "--no-progress",
            ]
        )
        assert code == 0  # dead URLs are recorded, not fatal
        assert "1 downloaded, 0 already present, 1 failed" in capsys.readouterr().out
        img = cv2.imread(str(tmp_path / "o/images/a/b/c/abcdef0123456789.jpg"))
        assert img is not None and max(img.shape[:2]) == 16


# ------------------------------------------------------------- --engine serial|ray (executor)
@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real local Ray (2 CPUs) that the CLI's ``--engine ray`` executors join."""
    from gldboxes.executor import RayExecutor

    r = RayExecutor(work_dir=tmp_path_factory.mktemp("raywork"), num_cpus=2, progress=False)
    r.start()
    yield
    r.shutdown()


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the executor's run records (timings, pids, paths)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("done.json", "stage.yaml")
    }


ENGINE = ["--num-cpus", "2", "--task-cpus", "0.5", "--no-progress"]
NET = ["--retries", "3", "--backoff", "0.02", "--timeout", "2"]


@pytest.mark.slow
class TestEngine:
    def test_gldv2_ray_equals_serial_and_rerun_skips(
        self,
        tmp_path: Path,
        mirror: Mirror,
        local_ray: None,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        srv, files, images = mirror

        def gldv2(out: Path, engine: str, shards: str) -> int:
            argv = ["-q", "download", "gldv2", "--split", "train", "--out", str(out)]
            argv += ["--shards", shards, "--base-url", srv.base_url, "--engine", engine]
            return cli_main([*argv, *ENGINE, *NET])

        trees = {}
        for engine in ("serial", "ray"):
            srv.add_fault("train/images_001.tar", Fault(drop_after=2000))  # resumed with Range
            assert gldv2(tmp_path / engine, engine, "0-1") == 0
            assert "2 shard(s) done now, 0 already done, 8 images" in capsys.readouterr().out
            hits = srv.hits("train/*.tar")
            # A rerun over more tars runs only the new one; the two finished tasks are skipped.
            assert gldv2(tmp_path / engine, engine, "0-2") == 0
            assert "1 shard(s) done now, 2 already done, 4 images" in capsys.readouterr().out
            assert srv.hits("train/*.tar") == hits + 1
            root = tmp_path / engine / "train"
            check_images(root, images)
            assert sorted(p.name for p in (root / "shards").glob("tars-*")) == [
                "tars-000",
                "tars-001",
                "tars-002",
            ]
            assert (root / "shards" / "tars-001" / "images.txt").read_text().split() == sorted(
                images_of_shard(files, "train", 1)
            )
            trees[engine] = _tree(tmp_path / engine)
            done = read_done(root / "shards" / "tars-002")
            assert done is not None and (done["pid"] == os.getpid()) == (engine == "serial")
        assert any(r.range_start for r in srv.requests("train/images_001.tar"))
        # Ray's outputs are the serial executor's, byte for byte (images, md5 lists, metadata,
        # manifest, per-task listings); only the run records differ.
        assert sorted(trees["ray"]) == sorted(trees["serial"])
        assert [k for k in trees["ray"] if trees["ray"][k] != trees["serial"][k]] == []
        assert sum(k.startswith("train/images/") for k in trees["ray"]) == 12
        # The threaded downloader (no --engine) reads the manifest: nothing left to fetch.
        hits = srv.hits("train/*.tar")
        rep = download_gldv2("train", tmp_path / "ray", shards="0-2", base_url=srv.base_url, **FAST)
        assert rep.ok and len(rep.skipped) == 3 and rep.done == []
        assert srv.hits("train/*.tar") == hits
        # ... and its images are the same bytes as the executor's.
        assert gldv2_default_tree(tmp_path / "plain", srv.base_url) == {
            k: v for k, v in trees["ray"].items() if k.startswith("train/images/")
        }

    def test_urls_ray_equals_serial_and_rerun_skips(
        self, tmp_path: Path, local_ray: None, capsys: pytest.CaptureFixture[str]
    ) -> None:
        files = {f"img/{i}.jpg": jpeg(i) for i in range(7)}
        with FaultServer(files) as srv:
            rows = [(f"{i:x}{i:x}c0ffee{i:08d}", srv.url(f"img/{i}.jpg")) for i in range(7)]
            rows.insert(3, ("deadbeef00000000", srv.url("img/gone.jpg")))  # 404: a failure
            path = tmp_path / "list.csv"
            path.write_text("id,url,landmark_id\n" + "".join(f"{a},{b},1\n" for a, b in rows))

            def urls(out: Path, *extra: str) -> int:
                argv = ["-q", "download", "urls", "--csv", str(path), "--out", str(out)]
                argv += ["--max-size", "32", "--retries", "0", "--timeout", "2"]
                return cli_main([*argv, *extra])

            trees = {}
            for engine in ("serial", "ray"):
                out = tmp_path / engine
                argv = ["--engine", engine, "--shard-size", "3", *ENGINE]
                srv.add_fault("img/5.jpg", Fault(status=503))  # one transient error ...
                assert urls(out, *argv, "--retries", "1", "--backoff", "0.01") == 0
                said = capsys.readouterr().out
                assert "7 downloaded, 0 already present, 1 failed" in said
                assert "3 task(s) run, 0 already done" in said
                trees[engine] = _tree(out)
                done = read_done(out / "shards" / "urls-00002")  # ran in a Ray worker or here
                assert done is not None and (done["pid"] == os.getpid()) == (engine == "serial")
                # A rerun skips the finished tasks; the one with the dead URL is retried ...
                dead = srv.hits("img/gone.jpg")
                all_hits = srv.hits("img/*")
                assert urls(out, *argv) == 0
                assert "1 task(s) run, 2 already done" in capsys.readouterr().out
                assert srv.hits("img/*") - all_hits == 1 and srv.hits("img/gone.jpg") == dead + 1
                # ... unless told to skip failures: then nothing is fetched.
                assert urls(out, *argv, "--skip-failed") == 0
                assert "0 task(s) run, 3 already done" in capsys.readouterr().out
                assert srv.hits("img/*") - all_hits == 1
                assert _tree(out) == trees[engine]
            assert sorted(trees["ray"]) == sorted(trees["serial"])
            assert [k for k in trees["ray"] if trees["ray"][k] != trees["serial"][k]] == []
            assert sorted(k for k in trees["ray"] if not k.startswith("shards/")) == sorted(
                ["failures.csv"] + [f"images/{image_relpath(i)}" for i, _ in rows if i[0] != "d"]
            )
            # Without --engine: the same images and the same failures.csv, byte for byte.
            assert urls(tmp_path / "plain", "--no-progress") == 0
            assert _tree(tmp_path / "plain") == {
                k: v for k, v in trees["ray"].items() if not k.startswith("shards/")
            }

    def test_urls_engine_bom_bad_rows_and_duplicates(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        files = {f"img/{i}.jpg": jpeg(i) for i in range(3)}
        with FaultServer(files) as srv:
            path = tmp_path / "l.csv"
            path.write_text(
                "id,url\n"
                f"aaaa000000000000,{srv.url('img/0.jpg')}\n"
                f"../x,{srv.url('img/1.jpg')}\n"
                f"aaaa000000000000,{srv.url('img/1.jpg')}\n"
                f"bbbb000000000000,{srv.url('img/2.jpg')}\n",
                "utf-8-sig",
            )
            argv = ["-q", "download", "urls", "--csv", str(path), "--out", str(tmp_path / "o")]
            argv += ["--engine", "serial", "--shard-size", "2", *ENGINE]
            assert cli_main(argv) == 0
            assert "2 downloaded, 0 already present, 1 failed" in capsys.readouterr().out
            rows = list(csv.DictReader(open(tmp_path / "o/failures.csv")))
            assert [(r["id"], r["reason"]) for r in rows] == [
                ("../x", "image id '../x' cannot be laid out as a/b/c/<id>.jpg"),
                ("aaaa000000000000", "duplicate id"),
            ]
            assert srv.hits("img/1.jpg") == 0
            for image_id in ("aaaa000000000000", "bbbb000000000000"):
                assert (tmp_path / "o/images" / image_relpath(image_id)).exists()

    @pytest.mark.parametrize("engine", ["serial", "ray"])
    def test_permanent_failures_are_not_retried_by_the_executor(
        self,
        tmp_path: Path,
        mirror: Mirror,
        request: pytest.FixtureRequest,
        capsys: pytest.CaptureFixture[str],
        engine: str,
    ) -> None:
        if engine == "ray":
            request.getfixturevalue("local_ray")
        srv, files, images = mirror
        srv.remove_file("train/images_000.tar")  # 404
        srv.add_fault("train/images_001.tar", Fault(corrupt=True, times=None))  # md5 mismatch
        evil = make_tar({"a/b/c/abc0.jpg": b"ok", "../escape.jpg": b"x"})  # unsafe member
        srv.add_file("train/images_003.tar", evil)
        md5 = hashlib.md5(evil).hexdigest()
        srv.add_file("md5sum/train/md5.images_003.txt", f"{md5}  images_003.tar\n".encode())
        argv = ["-q", "download", "gldv2", "--split", "train", "--out", str(tmp_path)]
        argv += ["--shards", "0-3", "--base-url", srv.base_url, "--engine", engine]
        argv += ["--no-metadata", *ENGINE, "--retries", "1", "--backoff", "0.01"]
        assert cli_main(argv) == 1
        out = capsys.readouterr().out
        assert "FAILED (3): images_000.tar, images_001.tar, images_003.tar" in out
        assert "HTTP 404" in out and "md5 mismatch" in out and "unsafe member" in out
        # One task attempt each: our own retries only (a 404 is not retried at all).
        assert srv.hits("train/images_000.tar") == 1
        assert srv.hits("train/images_001.tar") == 2  # --retries 1
        assert srv.hits("md5sum/train/md5.images_001.txt") == 2  # the list, refetched once
        assert srv.hits("train/images_003.tar") == 1
        assert not (tmp_path / "escape.jpg").exists()
        check_images(tmp_path / "train", {k: images[k] for k in images_of_shard(files, "train", 2)})

    def test_no_extract_is_refused(self, tmp_path: Path) -> None:
        argv = ["-q", "download", "gldv2", "--split", "train", "--out", str(tmp_path)]
        assert cli_main([*argv, "--engine", "serial", "--no-extract", "--no-progress"]) == 2
        assert not (tmp_path / "train" / "shards").exists()


def gldv2_default_tree(out: Path, base_url: str) -> dict[str, bytes]:
    """The images of shards 0-2 downloaded by the threaded downloader (no --engine)."""
    rep = download_gldv2("train", out, shards="0-2", base_url=base_url, workers=2, **FAST)
    assert rep.ok
    return {k: v for k, v in _tree(out).items() if k.startswith("train/images/")}
