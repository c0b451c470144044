"""Revisited ground-truth loading (restricted unpickler) and the resumable dataset downloader."""

from __future__ import annotations

import http.server
import io
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from retrieval.evaluation.datasets import (
    RevisitedDataset,
    UnsafePickleError,
    download_revisited,
    load_gnd,
    safe_load_pickle,
    save_gnd,
)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


class TestLoadGnd:
    def test_refuses_code(self, tmp_path: Path) -> None:
        p = tmp_path / "gnd_evil.pkl"
        p.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil()]}))
        with pytest.raises(UnsafePickleError, match=r"refusing to load (posix|os)\.system"):
            load_gnd(p)

    def test_numpy_arrays_admitted(self, tmp_path: Path) -> None:
        p = tmp_path / "gnd_np.pkl"
        cfg = {
            "imlist": ["a", "b"],
            "qimlist": ["q"],
            "gnd": [
                {
                    "bbx": np.array([1.0, 2.0, 3.0, 4.0]),
                    "easy": np.array([1]),
                    "hard": np.array([], dtype=int),
                    "junk": [0],
                }
            ],
        }
        p.write_bytes(pickle.dumps(cfg))
        g = load_gnd(p)
        assert g["gnd"][0] == {"bbx": [1.0, 2.0, 3.0, 4.0], "easy": [1], "hard": [], "junk": [0]}

    def test_malformed(self, tmp_path: Path) -> None:
        p = tmp_path / "gnd_bad.pkl"
        p.write_bytes(b"not a pickle")
        with pytest.raises(ValueError, match=r"gnd_bad\.pkl: not a readable pickle"):
            safe_load_pickle(p)
        p.write_bytes(
            pickle.dumps(
                {"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": [], "junk": []}]}
            )
        )
        with pytest.raises(ValueError, match=r"query 0 easy id 3 outside \[0, 1\)"):
            load_gnd(p)

    def test_round_trip(self, tmp_path: Path) -> None:
        cfg = {
            "imlist": ["a", "b"],
            "qimlist": ["q"],
            "gnd": [{"bbx": [0.0, 0.0, 5.0, 5.0], "easy": [0], "hard": [1], "junk": []}],
        }
        save_gnd(cfg, tmp_path / "gnd_x.pkl")
        assert load_gnd(tmp_path / "gnd_x.pkl") == cfg
        assert load_gnd(tmp_path / "gnd_x.json") == cfg

    @pytest.mark.parametrize("name,n_db", [("roxford5k", 4993), ("rparis6k", 6322)])
    def test_official_files(self, shared_data: Path, name: str, n_db: int) -> None:
        g = load_gnd(shared_data / "revisitop" / f"gnd_{name}.pkl")
        assert len(g["imlist"]) == n_db and len(g["qimlist"]) == 70
        assert g["qimlist"][0] == (
            "all_souls_000013" if name == "roxford5k" else "paris_defense_000605"
        )
        if name == "roxford5k":
            assert g["gnd"][0]["bbx"] == [136.5, 34.1, 648.5, 955.7]
            assert (len(g["gnd"][0]["easy"]), len(g["gnd"][0]["hard"])) == (65, 38)


def _make_tgz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    fail_first: set[str] = set()
    hits: dict[str, int] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        self.hits[name] = self.hits.get(name, 0) + 1
        if name not in self.files:
            self.send_error(404)
            return
        if name in self.fail_first:
            self.fail_first.discard(name)
            self.send_error(503)
            return
        data = self.files[name]
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture()
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("H", (_Handler,), {"files": {}, "fail_first": set(), "hits": {}})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    srv.shutdown()
    srv.server_close()


@pytest.mark.server
class TestDownloadRevisited:
    def test_download_resume_and_verify(
        self, tmp_path: Path, server: tuple[str, type[_Handler]]
    ) -> None:
        url, handler = server
        cfg = {
            "imlist": ["oxford_000001", "oxford_000002"],
            "qimlist": ["oxford_000001"],
            "gnd": [{"bbx": [0.0, 0.0, 1.0, 1.0], "easy": [1], "hard": [], "junk": []}],
        }
        handler.files["gnd_roxford5k.pkl"] = pickle.dumps(cfg, protocol=3)
        handler.files["oxbuild_images-v1.tgz"] = _make_tgz(
            {
                "oxbuild_images/oxford_000001.jpg": b"\xff\xd8one",
                "oxbuild_images/oxford_000002.jpg": b"\xff\xd8two",
                "../evil.jpg": b"no traversal",
            }
        )
        handler.fail_first.add("oxbuild_images-v1.tgz")
        # A partial transfer left by a killed run: resumed with a Range request.
        part = tmp_path / "roxford5k" / "archives" / "oxbuild_images-v1.tgz.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(handler.files["oxbuild_images-v1.tgz"][:10])
        ds = download_revisited("roxford5k", tmp_path, base_urls={"gnd": url, "images": url})
        assert isinstance(ds, RevisitedDataset) and ds.n_db == 2 and ds.n_queries == 1
        assert ds.image_path("oxford_000002").read_bytes() == b"\xff\xd8two"
        assert not (tmp_path / "evil.jpg").exists()
        assert handler.hits["oxbuild_images-v1.tgz"] == 2  # one 503, one successful resume
        # Rerun: nothing fetched again but the (small) ground truth check.
        download_revisited("roxford5k", tmp_path, base_urls={"gnd": url, "images": url})
        assert handler.hits["oxbuild_images-v1.tgz"] == 2

    def test_missing_images_reported(
        self, tmp_path: Path, server: tuple[str, type[_Handler]]
    ) -> None:
        url, handler = server
        cfg = {
            "imlist": ["a", "b"],
            "qimlist": ["a"],
            "gnd": [{"easy": [1], "hard": [], "junk": []}],
        }
        handler.files["gnd_roxford5k.pkl"] = pickle.dumps(cfg, protocol=3)
        handler.files["oxbuild_images-v1.tgz"] = _make_tgz({"x/a.jpg": b"a"})
        with pytest.raises(ValueError, match="1 images of the ground truth are missing"):
            download_revisited("roxford5k", tmp_path, base_urls={"gnd": url, "images": url})


def _revisited_files(seed: int = 0) -> dict[str, bytes]:
    """A roxford5k mirror: ground truth of three images and a tarball holding them (random
    bytes, so gzip cannot shrink them and a cut archive still holds whole early members)."""
    rng = np.random.default_rng(seed)
    names = ["oxford_000001", "oxford_000002", "oxford_000003"]
    cfg = {
        "imlist": names,
        "qimlist": names[:1],
        "gnd": [{"bbx": [0.0, 0.0, 1.0, 1.0], "easy": [1], "hard": [2], "junk": []}],
    }
    members = {f"oxbuild_images/{n}.jpg": b"\xff\xd8" + rng.bytes(40_000) for n in names}
    return {
        "gnd_roxford5k.pkl": pickle.dumps(cfg, protocol=3),
        "oxbuild_images-v1.tgz": _make_tgz(members),
    }


def _download_argv(out: Path, base_url: str) -> list[str]:
    return [
        "retrieval",
        "download",
        "roxford5k",
        "--out",
        str(out),
        "--gnd-base-url",
        base_url,
        "--images-base-url",
        base_url,
    ]


@pytest.mark.server
class TestDownloadRevisitedFaults:
    def test_truncated_tgz_then_full_tgz(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        from fault_server import FaultServer

        from gldboxes.cli.main import main as cli_main

        files = _revisited_files()
        full = files["oxbuild_images-v1.tgz"]
        cut = full[: int(len(full) * 0.6)]  # what a broken mirror serves: a valid gzip prefix
        root = tmp_path / "roxford5k"
        with FaultServer({**files, "oxbuild_images-v1.tgz": cut}) as srv:
            argv = _download_argv(tmp_path, srv.base_url)
            for _ in range(2):  # every run fails cleanly, none trusts the cut archive
                assert cli_main(argv) == 2
                err = capsys.readouterr().err
                assert "Traceback" not in err and len(err.strip().splitlines()) == 1
                assert "oxbuild_images-v1.tgz: truncated or corrupt archive" in err
                assert "rerun to fetch it again" in err
                assert not (root / "archives" / "oxbuild_images-v1.tgz").exists()
                assert list((root / "jpg").iterdir()) == []  # no partial extraction kept
                assert not list(root.glob(".extract-*"))
            assert srv.hits("oxbuild_images-v1.tgz") == 2
            srv.add_file("oxbuild_images-v1.tgz", full)  # the mirror is fixed
            assert cli_main(argv) == 0
            assert "roxford5k: 3 database images, 1 queries" in capsys.readouterr().out
            assert srv.hits("oxbuild_images-v1.tgz") == 3
        ds = RevisitedDataset.load(root)
        assert ds.missing_images() == []
        with tarfile.open(fileobj=io.BytesIO(full)) as tar:
            member = tar.extractfile("oxbuild_images/oxford_000003.jpg")
            assert member is not None
            assert ds.image_path("oxford_000003").read_bytes() == member.read()

    def test_offline_is_one_line(
        self,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        import time

        from fault_server import FaultServer

        from gldboxes.cli.main import main as cli_main

        srv = FaultServer().start()
        base_url = srv.base_url
        srv.stop()  # nothing listens there now: connection refused
        waits: list[float] = []
        monkeypatch.setattr(time, "sleep", waits.append)  # the retries' backoff, not waited
        assert cli_main(_download_argv(tmp_path, base_url)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert f"cannot download {base_url}gnd_roxford5k.pkl" in lines[0]
        assert "Connection refused" in lines[0] and "check the network" in lines[0]
        assert len(waits) == 5  # retried before giving up
