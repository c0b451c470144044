"""The executor interface (serial engine): shards, done-markers, skips, retries, model cache,
and the GLD download stages against a local HTTP server. Ray runs in tests/test_sharded.py
(here only: a local Ray listens on loopback only)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fault_server import Fault, FaultServer

from gldboxes import executor as ex
from gldboxes import gld_stages
from gldboxes.executor import (
    Resources,
    SerialExecutor,
    Shard,
    ShardFailedError,
    Stage,
    make_shards,
    read_done,
)


# ------------------------------------------------------------------------------ toy stages
def _square_stage(shard: Shard, out: Path, model: Any, *, log: str) -> dict[str, int]:
    """Write the squares of the shard's numbers; log every call (pid, shard) to ``log``."""
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"{shard.name}\n")
    x = np.asarray(shard.items, np.int64)
    np.save(out / "squares.npy", x * x * int(model["factor"] if model else 1))
    return {"items": len(shard.items)}


def _flaky_stage(shard: Shard, out: Path, model: Any, *, state: str, fail: str) -> dict[str, int]:
    """Fail ``fail`` times (counted in files under ``state``) for shard-00001, then work."""
    if shard.name == "shard-00001":
        marks = Path(state)
        marks.mkdir(exist_ok=True)
        n = len(list(marks.iterdir()))
        if fail == "always" or n < int(fail):
            (marks / f"attempt-{n}").touch()
            (out / "partial.bin").write_bytes(b"half")  # left behind by the failure
            raise RuntimeError(f"injected failure {n}")
    (out / "ok.txt").write_text(",".join(map(str, shard.items)))
    return {"items": len(shard.items)}


def _load_model(path: str) -> dict[str, int]:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    return {"factor": 3}


def _outputs(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("done.json", "stage.yaml")
    }


# ------------------------------------------------------------------------------------ tests
class TestShards:
    def test_make_shards_cover_items_once(self) -> None:
        shards = make_shards(list(range(23)), 5)
        assert [s.name for s in shards] == [f"shard-{i:05d}" for i in range(5)]
        assert [len(s.items) for s in shards] == [5, 5, 5, 5, 3]
        assert [x for s in shards for x in s.items] == list(range(23))
        assert shards[4].meta == {"start": 20, "stop": 23}

    def test_exception(self) -> None:
        with pytest.raises(ValueError, match="shard_size"):
            make_shards([1], 0)
        with pytest.raises(ValueError, match="folder name"):
            Shard(0, (1,), "../x")
        with pytest.raises(ValueError, match="num_cpus"):
            Resources(num_cpus=0)
        with pytest.raises(ValueError, match="memory"):
            Resources(memory=-1)
        stage = Stage("s", lambda s, o, m: {}, conf={})
        with pytest.raises(ValueError, match="JSON-able"):
            stage.inputs_hash(Shard(0, (object(),)))
        assert Resources(num_cpus=0.5, memory=1 << 30).ray_options() == {
            "num_cpus": 0.5,
            "num_gpus": 0.0,
            "memory": 1 << 30,
        }


class TestSerialExecutor:
    def test_smoke_done_markers_and_skip(self, tmp_path: Path) -> None:
        log = tmp_path / "calls.txt"
        stage = Stage("square", functools.partial(_square_stage, log=str(log)), conf={"v": 1})
        shards = make_shards(list(range(10)), 4)
        out = tmp_path / "out"
        rep = SerialExecutor(progress=False).run(stage, shards, out)
        assert rep.ok and rep.done == ["shard-00000", "shard-00001", "shard-00002"]
        assert rep.counts == {"items": 10}
        got = np.concatenate([np.load(out / s.name / "squares.npy") for s in shards])
        np.testing.assert_array_equal(got, np.arange(10) ** 2)
        done = read_done(out / "shard-00002")
        assert done is not None
        assert done["counts"] == {"items": 2} and done["n_items"] == 2
        assert done["config_hash"] == stage.config_hash
        assert done["inputs_hash"] == stage.inputs_hash(shards[2])
        assert done["versions"]["numpy"] == np.__version__
        assert done["outputs"] == ["squares.npy"]
        assert log.read_text().split() == [s.name for s in shards]

        # Rerun: everything skipped, nothing called.
        rep2 = SerialExecutor(progress=False).run(stage, shards, out)
        assert rep2.skipped == [s.name for s in shards] and not rep2.done
        assert rep2.counts == {"items": 10}
        assert len(log.read_text().split()) == 3

        # A changed shard is redone alone; a changed config redoes all; overwrite too.
        shards2 = [*shards[:2], Shard(2, (8, 9, 10), "shard-00002")]
        rep3 = SerialExecutor(progress=False).run(stage, shards2, out)
        assert rep3.done == ["shard-00002"]
        np.testing.assert_array_equal(np.load(out / "shard-00002" / "squares.npy"), [64, 81, 100])
        stage_v2 = Stage("square", stage.fn, conf={"v": 2})
        assert len(SerialExecutor(progress=False).run(stage_v2, shards2, out).done) == 3
        assert (
            len(SerialExecutor(progress=False).run(stage_v2, shards2, out, overwrite=True).done)
            == 3
        )
        assert not list(out.glob(".*"))  # no temp folders left

    def test_retry_then_success(self, tmp_path: Path) -> None:
        fn = functools.partial(_flaky_stage, state=str(tmp_path / "st"), fail="2")
        stage = Stage("flaky", fn, retries=2)
        out = tmp_path / "out"
        rep = SerialExecutor(progress=False).run(stage, make_shards([1, 2, 3, 4], 2), out)
        assert rep.ok and rep.done == ["shard-00000", "shard-00001"]
        assert len(list((tmp_path / "st").iterdir())) == 2
        assert (out / "shard-00001" / "ok.txt").read_text() == "3,4"
        assert not (out / "shard-00001" / "partial.bin").exists()
        assert not list(out.glob(".*"))

    def test_failed_shard_is_redone_alone(self, tmp_path: Path) -> None:
        shards = make_shards([1, 2, 3, 4, 5, 6], 2)
        out = tmp_path / "out"
        bad = Stage(
            "flaky",
            functools.partial(_flaky_stage, state=str(tmp_path / "a"), fail="always"),
            retries=1,
        )
        with pytest.raises(ShardFailedError, match="shard-00001") as info:
            SerialExecutor(progress=False).run(bad, shards, out)
        assert list(info.value.failed) == ["shard-00001"]
        assert len(list((tmp_path / "a").iterdir())) == 2  # first attempt + one retry
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith("stage")) == [
            "shard-00000",
            "shard-00002",
        ]
        rep = SerialExecutor(progress=False).run(bad, shards, out, raise_on_failure=False)
        assert rep.failed and rep.skipped == ["shard-00000", "shard-00002"]
        # Same config, a fixed function: only the failed shard runs.
        good = Stage(
            "flaky", functools.partial(_flaky_stage, state=str(tmp_path / "b"), fail="0"), retries=1
        )
        rep2 = SerialExecutor(progress=False).run(good, shards, out)
        assert rep2.done == ["shard-00001"] and rep2.skipped == ["shard-00000", "shard-00002"]
        assert [(out / s.name / "ok.txt").read_text() for s in shards] == ["1,2", "3,4", "5,6"]

    def test_model_loaded_once_per_process(self, tmp_path: Path) -> None:
        loads = tmp_path / "loads.txt"
        stage = Stage(
            "square-model",
            functools.partial(_square_stage, log=str(tmp_path / "calls.txt")),
            conf={"unique": str(tmp_path)},
            load_model=functools.partial(_load_model, str(loads)),
        )
        rep = SerialExecutor(progress=False).run(
            stage, make_shards(list(range(12)), 3), tmp_path / "o"
        )
        assert len(rep.done) == 4
        assert loads.read_text().split() == [str(os.getpid())]
        assert ex.model_loads()[stage.model_key] == 1
        np.testing.assert_array_equal(
            np.load(tmp_path / "o" / "shard-00003" / "squares.npy"), 3 * np.arange(9, 12) ** 2
        )

    def test_engine_options(self, tmp_path: Path) -> None:
        p = argparse.ArgumentParser()
        ex.add_engine_options(p)
        a = p.parse_args(["--engine", "ray", "--task-cpus", "0.5", "--num-cpus", "2"])
        r = ex.executor_from_args(a, tmp_path)
        assert isinstance(r, ex.RayExecutor) and r.resources == Resources(num_cpus=0.5)
        assert r.num_cpus == 2
        assert isinstance(ex.executor_from_args(p.parse_args([]), tmp_path), SerialExecutor)
        with pytest.raises(ValueError, match="--engine"):
            ex.make_executor("spark", work_dir=tmp_path)

    def test_ray_temp_dir_short(self, tmp_path: Path) -> None:
        deep = tmp_path / ("x" * 80)
        r = ex.RayExecutor(work_dir=deep)
        t = r.temp_dir()
        assert len(str(t)) <= 40 and t.resolve() == (deep / "ray").resolve()


# --------------------------------------------------------------------- GLD download stages
def gld_files(n_tars: int = 2, per_tar: int = 3) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Served files of a fake GLDv2 ``train`` split, and the images they contain."""
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    images: dict[str, bytes] = {}
    for t in range(n_tars):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for j in range(per_tar):
                iid = f"{t:x}{j:x}" + "".join(rng.choice(list("0123456789abcdef"), 14))
                name = f"{iid[0]}/{iid[1]}/{iid[2]}/{iid}.jpg"
                data = rng.integers(0, 256, 500 + j, dtype=np.uint8).tobytes()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                images[name] = data
        tar = buf.getvalue()
        files[f"train/images_{t:03d}.tar"] = tar
        md5 = hashlib.md5(tar).hexdigest()
        files[f"md5sum/train/md5.images_{t:03d}.txt"] = f"{md5}  images_{t:03d}.tar\n".encode()
    return files, images


class TestDownloadStages:
    def test_gldv2_stage_resumes_and_verifies(self, tmp_path: Path) -> None:
        files, images = gld_files()
        with FaultServer(files) as srv:
            srv.add_fault("train/images_000.tar", Fault(drop_after=700))  # resumed with Range
            srv.add_fault("train/images_001.tar", Fault(corrupt=True))  # md5 mismatch, refetched
            stage, shards = gld_stages.gldv2_shard_stage(
                "train", tmp_path / "gld", [0, 1], base_url=srv.base_url, backoff=0.01
            )
            rep = SerialExecutor(progress=False).run(stage, shards, tmp_path / "gld" / "shards")
            assert any(r.range_start for r in srv.requests("train/images_000.tar"))
        assert rep.counts["images"] == 6 and rep.counts["tars"] == 2
        root = tmp_path / "gld" / "images"
        got = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.jpg")}
        assert got == images
        listed = [
            ln for s in shards for ln in (rep.out_dir / s.name / "images.txt").read_text().split()
        ]
        assert sorted(listed) == sorted(images)
        assert not (tmp_path / "gld" / "tars" / "images_000.tar").exists()  # removed after use

    def test_url_list_stage(self, tmp_path: Path) -> None:
        import cv2

        img = np.zeros((40, 60, 3), np.uint8)
        cv2.rectangle(img, (5, 5), (30, 20), (0, 200, 255), -1)
        _, jpg = cv2.imencode(".jpg", img)
        files = {f"img/{i}.jpg": jpg.tobytes() for i in range(5)}
        ids = [f"{i:016x}" for i in range(6)]
        with FaultServer(files) as srv:
            csv_path = tmp_path / "urls.csv"
            csv_path.write_text(
                "id,url\n" + "".join(f"{d},{srv.url(f'img/{i}.jpg')}\n" for i, d in enumerate(ids))
            )
            stage, shards = gld_stages.url_list_stage(
                csv_path, tmp_path / "u", rows_per_shard=4, retries=0
            )
            rep = SerialExecutor(progress=False).run(stage, shards, tmp_path / "u" / "shards")
        assert rep.counts == {"rows": 6, "downloaded": 5, "present": 0, "failed": 1}
        assert len(list((tmp_path / "u" / "images").rglob("*.jpg"))) == 5
        fails = (rep.out_dir / "urls-00001" / "failures.csv").read_text().splitlines()
        assert fails[0] == "id,url,reason" and fails[1].startswith(ids[5] + ",")


# ------------------------------------------------------------------ local Ray on loopback
def _worker_pid() -> int:
    return os.getpid()


def _listening(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, process name) of every TCP socket listening in ``pids``."""
    import psutil

    names = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            names[pid] = psutil.Process(pid).name()
    return [
        (c.laddr.ip, c.laddr.port, c.pid, names[c.pid])
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in names
    ]


@pytest.mark.server
@pytest.mark.slow
class TestLocalRayLoopback:
    def test_real_case_every_listener_on_127_0_0_1(self, tmp_path: Path) -> None:
        """GCS, raylet, agents, a worker and the driver's core worker listen on loopback only."""
        import psutil
        import ray
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        r = ex.RayExecutor(work_dir=tmp_path, num_cpus=1, progress=False)
        r.start()
        try:
            worker = ray.get(ray.remote(_worker_pid).remote())
            me = psutil.Process()
            found = _listening({me.pid, worker} | {p.pid for p in me.children(recursive=True)})
        finally:
            r.shutdown()
        # the check saw Ray's servers: GCS, raylet and the task's worker
        assert {"gcs_server", "raylet"} <= {f[3] for f in found}, found
        assert worker in {f[2] for f in found}, found
        exposed = [f for f in found if f[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        assert not exposed, f"local Ray listens beyond loopback: {exposed}"


# ------------------------------------------------- Ray cluster with token authentication
_RAY = Path(sys.executable).with_name("ray")
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="class")
def token_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``ray start --head`` on 127.0.0.1 with token auth, as the README's recipe starts it.

    Its HOME holds ``.ray/auth_token`` and RAY_AUTH_MODE is unset, so the head turns token auth
    on by itself. ``ray stop`` kills every Ray process of the machine (by name), so the head
    runs in its own process group and only that group is stopped.

    Returns:
        ``(address, home)``: ``127.0.0.1:PORT`` and the HOME whose ``.ray/auth_token`` it uses.
    """
    from gldboxes.fodb import free_port

    home = tmp_path_factory.mktemp("rayhome")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("a" * 32)
    temp_dir = tempfile.mkdtemp(prefix="gldrh-")  # short: Ray's socket paths hang off it
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _AUTH_VARS and k != "RAY_ADDRESS"}
    # Keep 127.0.0.1 (Linux Ray otherwise swaps it for the external IP and listens there).
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    args = [str(_RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port)]
    args += ["--dashboard-host", "127.0.0.1", "--include-dashboard=false", "--num-cpus", "1"]
    args += ["--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())]
    args += ["--temp-dir", temp_dir, "--disable-usage-stats"]
    proc = subprocess.Popen(
        args, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        log = proc.communicate(timeout=90)[0].decode(errors="replace")
        assert proc.returncode == 0, log[-2000:]
        assert "Token authentication is enabled" in log, log[-2000:]
        yield f"127.0.0.1:{port}", home
    finally:
        if proc.poll() is None:
            proc.kill()
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            while _group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_auth_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A monkeypatch with the Ray auth variables cleared; Ray's cached mode and token are reread
    after it restored them, so later tests see this process's own settings again."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    assert not ray.is_initialized()
    with monkeypatch.context() as mp:
        for var in (*_AUTH_VARS, "RAY_ADDRESS"):
            mp.delenv(var, raising=False)
        # the driver side of the loopback head: keep 127.0.0.1 as given
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        yield mp
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.mark.server
@pytest.mark.slow
class TestRayTokenAuth:
    def test_real_case_readme_recipe(
        self, token_head: tuple[str, Path], ray_auth_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Only RAY_ADDRESS, as the README says: the head's ~/.ray/auth_token is used."""
        import ray.cloudpickle

        address, home = token_head
        ray_auth_env.setenv("HOME", str(home))
        ray_auth_env.setenv("RAY_ADDRESS", address)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        log = tmp_path / "calls.txt"
        stage = Stage("square", functools.partial(_square_stage, log=str(log)), conf={"v": 1})
        shards = make_shards(list(range(7)), 3)
        with ex.RayExecutor(work_dir=tmp_path / "w", progress=False) as r:
            assert r.cluster_address == address
            rep = r.run(stage, shards, tmp_path / "out")
            assert ray.cluster_resources().get("CPU") == 1.0  # the head's 1 CPU, not a local Ray
        assert rep.ok and rep.done == [s.name for s in shards] and rep.counts == {"items": 7}
        got = np.concatenate([np.load(tmp_path / "out" / s.name / "squares.npy") for s in shards])
        np.testing.assert_array_equal(got, np.arange(7) ** 2)
        pids = {(read_done(tmp_path / "out" / s.name) or {}).get("pid") for s in shards}
        assert os.getpid() not in pids and None not in pids  # ran in the head's workers
        assert not (tmp_path / "w" / "ray").exists()  # no local Ray was started

    def test_exception_wrong_or_missing_token(
        self, token_head: tuple[str, Path], ray_auth_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """A wrong token and no token at all: one line naming RAY_ADDRESS and what to set."""
        address, _ = token_head
        ray_auth_env.setenv("RAY_ADDRESS", address)
        ray_auth_env.setenv("RAY_gcs_server_port_wait_time_s", "2")  # Ray retries 20 s by default
        empty_home = tmp_path / "home"
        empty_home.mkdir()
        ray_auth_env.setenv("HOME", str(empty_home))
        cases = {
            "no token was sent (RAY_AUTH_MODE=disabled)": {},
            "the token in $RAY_AUTH_TOKEN was rejected": {"RAY_AUTH_TOKEN": "b" * 32},
        }
        for said, env in cases.items():
            with ray_auth_env.context() as mp:
                for k, v in env.items():
                    mp.setenv(k, v)
                r = ex.RayExecutor(work_dir=tmp_path / "w", progress=False)
                with pytest.raises(ValueError) as info:
                    r.start()
            msg = str(info.value)
            assert "\n" not in msg, msg
            assert msg.startswith(f"RAY_ADDRESS={address}: "), msg
            assert said in msg and "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=" in msg, msg
            assert "RAY_AUTH_TOKEN_PATH=" in msg, msg
