"""The CLI's one error path: an expected error is one stderr line and exit code 2.

Every case runs the real command in a subprocess (``python -m gldboxes ...``); the processes are
started together once per module to keep the wall time low. ``--debug`` and
``GLDBOXES_DEBUG=1`` bring the traceback back; a bug (an unexpected exception) keeps it anyway.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import urllib.error
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gldboxes.cli.main import expected_error
from gldboxes.cli.main import main as cli_main

REPO = Path(__file__).resolve().parents[1]


class _Hostile:
    """Unpickling this runs ``os.system``: the restricted unpickler must refuse it."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (os.system, ("echo pwned",))


def _revisited(root: Path) -> Path:
    """A two-image Revisited-style folder (one query) for ``retrieval rmac``."""
    from retrieval.evaluation.datasets import save_gnd

    (root / "jpg").mkdir(parents=True)
    for i, name in enumerate(("d0", "d1", "q0")):
        img = np.full((40, 48, 3), 60 * i, dtype=np.uint8)
        Image.fromarray(img).save(root / "jpg" / f"{name}.jpg")
    gnd = {"easy": [0], "hard": [], "junk": [], "bbx": [0.0, 0.0, 40.0, 30.0]}
    save_gnd({"imlist": ["d0", "d1"], "qimlist": ["q0"], "gnd": [gnd]}, root / "gnd_tiny.pkl")
    return root


def _cases(tmp: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """name -> (CLI arguments, extra environment, text the error line must name)."""
    bad_lm = tmp / "bad_landmark.csv"
    bad_lm.write_text("id,landmark_id\na,1\nb,3.5\n")
    header_only = tmp / "header_only.csv"
    header_only.write_text("id,landmark_id\n")
    hostile = tmp / "hostile.pkl"
    hostile.write_bytes(pickle.dumps(_Hostile()))
    tagged = tmp / "tagged.yaml"
    tagged.write_text("quick: true\nworld: !!python/object/apply:os.system ['echo pwned']\n")
    broken = tmp / "broken.yaml"
    broken.write_text("seed: 1\nworld: [1, 2\nviews: false\n")
    dataset = _revisited(tmp / "tiny_revisited")
    out = str(tmp / "out")
    offline = {
        "KERAS_HOME": str(tmp / "keras_home"),  # no cached weights
        "https_proxy": "http://127.0.0.1:9",  # and no way out
        "http_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "no_proxy": "",
        "NO_PROXY": "",
    }
    split = ["split", "--out", out, "--csv"]
    evaluate = ["retrieval", "evaluate", "--gnd", str(hostile), "--ranks", str(tmp / "r.npy")]
    return {
        "landmark": ([*split, str(bad_lm)], {}, "bad_landmark.csv:3: landmark_id '3.5'"),
        "no_rows": ([*split, str(header_only)], {}, "header_only.csv:2: no rows"),
        "missing": ([*split, str(tmp / "nope.csv")], {}, "nope.csv"),
        "pickle": (evaluate, {}, "hostile.pkl: refusing to load"),
        "yaml_tag": (["pipeline", "--config", str(tagged)], {}, "tagged.yaml:2:"),
        "yaml_syntax": (["pipeline", "--config", str(broken)], {}, "broken.yaml:3:"),
        "rmac_offline": (
            ["retrieval", "rmac", "--dataset", str(dataset), "--out", out],
            offline,
            "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        "debug_flag": (["--debug", *split, str(bad_lm)], {}, "bad_landmark.csv:3:"),
        "debug_env": (evaluate, {"GLDBOXES_DEBUG": "1"}, "hostile.pkl"),
    }


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "TQDM_DISABLE": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO),
        "GLDBOXES_DEBUG": "",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "gldboxes", "-q", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[str], str]]:
    """Every case, run concurrently once: name -> (finished process, text it must name)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    cases = _cases(tmp)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_run, a, e, tmp) for name, (a, e, _) in cases.items()}
        return {name: (futures[name].result(), cases[name][2]) for name in cases}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


class TestOneLineErrors:
    @pytest.mark.parametrize(
        "case",
        ["landmark", "no_rows", "missing", "pickle", "yaml_tag", "yaml_syntax", "rmac_offline"],
    )
    def test_exception(self, runs: dict[str, Any], case: str) -> None:
        proc, names = runs[case]
        lines = _error_lines(proc.stderr)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(lines) == 1, proc.stderr
        assert names in lines[0] and " ERROR] " in lines[0]

    def test_offline_weights_say_what_to_do(self, runs: dict[str, Any]) -> None:
        proc, _ = runs["rmac_offline"]
        assert "--weights FILE" in proc.stderr and "keras_home" in proc.stderr

    def test_yaml_python_tag_is_refused_not_run(self, runs: dict[str, Any]) -> None:
        proc, _ = runs["yaml_tag"]
        assert "pwned" not in proc.stdout and "python/object" in proc.stderr

    @pytest.mark.parametrize("case", ["debug_flag", "debug_env"])
    def test_debug_shows_the_traceback(self, runs: dict[str, Any], case: str) -> None:
        proc, names = runs[case]
        assert proc.returncode == 2
        assert "Traceback (most recent call last)" in proc.stderr
        assert names in _error_lines(proc.stderr)[0]


class TestErrorKinds:
    """In-process: which exceptions are expected, and that bugs keep their traceback."""

    @pytest.mark.parametrize(
        "exc",
        [
            ValueError("x.csv:3: bad"),
            FileNotFoundError(2, "No such file or directory", "x.csv"),
            ConnectionError("connection refused"),
            urllib.error.URLError("Temporary failure in name resolution"),
            TimeoutError("timed out"),
        ],
    )
    def test_expected(self, exc: Exception) -> None:
        message = expected_error(exc)
        assert message is not None and "\n" not in message

    def test_network_errors_get_advice(self) -> None:
        import requests

        from gldboxes.http import DownloadError

        for exc in (
            requests.ConnectionError("Max retries exceeded"),
            DownloadError("http://x/y.tar: failed after 3 attempts"),
            urllib.error.URLError("down"),
        ):
            assert "check the network" in (expected_error(exc) or "")
        gone = DownloadError("http://x/y.tar: HTTP 404", status=404)
        assert expected_error(gone) == "http://x/y.tar: HTTP 404"

    def test_failed_shards_and_servers_are_one_line(self) -> None:
        """A stage whose shards failed after retries, or a server that did not start, is an
        expected failure the message explains: one line, no traceback; bugs keep theirs."""
        from gldboxes.executor import ShardFailedError
        from gldboxes.fodb import ServerStartError

        shards = expected_error(ShardFailedError("download", {"tar-00003": "HTTP 404"}))
        assert shards is not None and "rerun to redo only them" in shards
        server = ServerStartError("mongod exited with code 100 (data dir /x): bad\nlog tail")
        assert expected_error(server) == "mongod exited with code 100 (data dir /x): bad log tail"
        assert expected_error(RuntimeError("a bug")) is None

    def test_unreachable_server_is_named(self) -> None:
        import httpx
        import requests

        request = httpx.Request("GET", "http://127.0.0.1:9/api/projects/1")
        refused = httpx.ConnectError("[Errno 111] Connection refused", request=request)
        message = expected_error(refused)
        assert message is not None and message.startswith("http://127.0.0.1:9/api/projects/1: ")
        assert "check the network" in message
        prepared = requests.Request("GET", "http://127.0.0.1:9/health").prepare()
        message = expected_error(requests.ConnectionError("refused", request=prepared))
        assert message is not None and message.startswith("http://127.0.0.1:9/health: ")

    def test_multi_line_message_becomes_one_line(self) -> None:
        assert expected_error(ValueError("a.yaml:2: bad\n  here")) == "a.yaml:2: bad here"

    def test_bugs_are_not_expected(self) -> None:
        assert expected_error(RuntimeError("boom")) is None
        assert expected_error(KeyError("k")) is None

    def test_bug_keeps_its_traceback(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        import gldboxes.split

        def broken(*args: Any, **kwargs: Any) -> Path:
            raise KeyError("a bug")

        monkeypatch.setattr(gldboxes.split, "main", broken)
        with pytest.raises(KeyError, match="a bug"):
            cli_main(["-q", "split", "--csv", "x.csv", "--out", str(tmp_path)])

    def test_network_error_exits_2(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        import gldboxes.split

        def offline(*args: Any, **kwargs: Any) -> Path:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

        monkeypatch.setattr(gldboxes.split, "main", offline)
        assert cli_main(["-q", "split", "--csv", "x.csv", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "name resolution" in err and len(_error_lines(err)) == 1
