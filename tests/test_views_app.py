"""End to end: ``gldboxes view boxes --launch`` serves the App; headless Chromium sees the grid.

The command runs as a real child process: it starts its own mongod (the FiftyOne database
wheel) in a temporary folder, builds the box dataset of the synthetic world, serves the FiftyOne
App on 127.0.0.1, and on Ctrl-C (SIGINT) stops the App and the database. Debian's ``chromium``
driven by pip ``playwright`` opens the dataset page, waits for the sample grid, saves a
screenshot as a test artefact and checks the page shows the dataset's samples.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gldboxes import fodb
from gldboxes.synth import confs, generate_world

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic world (shared with tests/test_views.py when run together)."""
    return generate_world(tmp_path_factory.getbasetemp() / "synth-tiny", confs["tiny"])


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$GLDBOXES_TEST_ARTEFACTS`` or ``<pytest tmp>/artefacts``."""
    env = os.environ.get("GLDBOXES_TEST_ARTEFACTS")
    path = Path(env) if env else tmp_path_factory.getbasetemp() / "artefacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _require_browser() -> None:
    """Fail (never skip) when the browser stack is missing, naming what to install."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} not found: install the Debian package `chromium` "
            "(apt-get install -y chromium)"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(
            "the pip package `playwright` is missing (pip install -e .[dev]); "
            "it drives /usr/bin/chromium, no `playwright install` needed"
        )


class _Child:
    """A ``gldboxes`` child process whose stdout/stderr lines are collected by a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gldboxes.cli.main", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self._q.empty():
                    break
                continue
            if m := re.search(pattern, line):
                return m
        raise AssertionError(
            f"no line matching {pattern!r} within {timeout:.0f} s; "
            f"output:\n{''.join(self.lines)[-4000:]}"
        )

    def output(self) -> str:
        self._t.join(timeout=10)
        return "".join(self.lines)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture()
def launched(world: Path, tmp_path: Path) -> Iterator[tuple[_Child, str, Path]]:
    """``gldboxes view boxes --world W --launch`` running; yields (child, dataset URL, db dir)."""
    _require_browser()
    db_dir = tmp_path / "db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_DATABASE_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env["GLDBOXES_DB_DIR"] = str(tmp_path / "unused")  # --db-dir must win
    # A retrieval dataset (bulk-inserted samples) in the same database, to open as well.
    n_db = len(list((world / "retrieval/jpg").glob("*.jpg")))
    gnd = json.loads((world / "retrieval/gnd_synth.json").read_text())
    rng = np.random.default_rng(0)
    ranks = np.stack([rng.permutation(len(gnd["imlist"])) for _ in gnd["qimlist"]], axis=1)
    np.save(tmp_path / "ranks.npy", ranks)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "gldboxes.cli.main",
            "view",
            "retrieval",
            "--dataset",
            str(world / "retrieval"),
            "--ranks",
            str(tmp_path / "ranks.npy"),
            "--top-k",
            "10",
            "--name",
            "app-test-retrieval",
            "--db-dir",
            str(db_dir),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0 and n_db > 0, built.stdout + built.stderr
    port = fodb.free_port()
    child = _Child(
        [
            "view",
            "boxes",
            "--world",
            str(world),
            "--db-dir",
            str(db_dir),
            "--name",
            "app-test-boxes",
            "--launch",
            "--port",
            str(port),
        ],
        env,
    )
    try:
        m = child.wait_for(r"FiftyOne App: (http://127\.0\.0\.1:\d+/datasets/\S+)", 180)
        yield child, m.group(1), db_dir
    finally:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGINT)
            try:
                child.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(timeout=10)


@pytest.mark.server
@pytest.mark.slow
class TestApp:
    def test_grid_shows_samples_and_ctrl_c_stops_everything(
        self, launched: tuple[_Child, str, Path], world: Path, artefacts: Path
    ) -> None:
        from playwright.sync_api import sync_playwright

        child, url, db_dir = launched
        n_images = sum(1 for _ in csv.DictReader(open(world / "train/train.csv")))
        assert url.endswith("/datasets/app-test-boxes")
        state = fodb._running_server(db_dir)
        assert state is not None, "the command should run its own mongod in --db-dir"
        app_port = int(url.split(":")[2].split("/")[0])

        shot = artefacts / "app-boxes-grid.png"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url, wait_until="domcontentloaded", timeout=120_000)
                page.wait_for_selector("[data-cy=looker]", timeout=120_000)
                page.wait_for_selector("canvas[canvas-loaded=true]", timeout=120_000)
                counts = page.locator("[data-cy=entry-counts]").first
                counts.wait_for(timeout=60_000)
                page.wait_for_function(
                    "n => document.querySelector('[data-cy=entry-counts]')"
                    "?.innerText.replace(/\\s+/g, ' ').includes(n + ' samples')",
                    arg=n_images,
                    timeout=60_000,
                )
                dismiss = page.get_by_text("Dismiss", exact=True)
                if dismiss.count():  # the App's advert popup hides part of the grid
                    dismiss.first.click()
                time.sleep(1.0)  # let the remaining thumbnails paint for the screenshot
                shown_name = page.evaluate(
                    "n => [...document.querySelectorAll('input')].some(i => i.value === n)"
                    " || document.body.innerText.includes(n)",
                    "app-test-boxes",
                )
                page.screenshot(path=str(shot))
                text = page.inner_text("body")
                n_tiles = page.locator("[data-cy=looker]").count()
                n_loaded = page.locator("canvas[canvas-loaded=true]").count()
            finally:
                browser.close()
        n_retrieval = (
            len(json.loads((world / "retrieval/gnd_synth.json").read_text())["qimlist"]) * 11
        )
        shot2 = artefacts / "app-retrieval-grid.png"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
            )
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(
                    url.replace("app-test-boxes", "app-test-retrieval"),
                    wait_until="domcontentloaded",
                    timeout=120_000,
                )
                page.wait_for_selector("canvas[canvas-loaded=true]", timeout=120_000)
                page.wait_for_function(
                    "n => document.querySelector('[data-cy=entry-counts]')"
                    "?.innerText.replace(/\\s+/g, ' ').includes(n + ' samples')",
                    arg=n_retrieval,
                    timeout=60_000,
                )
                dismiss = page.get_by_text("Dismiss", exact=True)
                if dismiss.count():
                    dismiss.first.click()
                time.sleep(1.0)
                page.screenshot(path=str(shot2))
                text2 = " ".join(page.inner_text("body").split())
            finally:
                browser.close()
        print(f"screenshots: {shot} {shot2}")
        assert f"{n_retrieval} samples" in text2 and "label_medium" in text2
        assert "positive" in text2 or "negative" in text2  # protocol labels on the tiles
        assert shot.is_file() and shot.stat().st_size > 10_000
        assert f"{n_images} samples" in " ".join(text.split())
        assert shown_name, "the dataset name should be shown in the header"
        assert "ground_truth" in text and "no_landmark" in text  # our fields in the sidebar
        assert "404" not in text and "Something went wrong" not in text
        assert 1 <= n_tiles <= n_images and n_loaded >= 1

        # Ctrl-C: the command stops the App and its database, then exits 0.
        child.proc.send_signal(signal.SIGINT)
        assert child.proc.wait(timeout=60) == 0
        out = child.output()
        assert "stopping the FiftyOne App" in out and "mongod on port" in out
        assert not _port_open(app_port)
        assert not _port_open(state.port)
        assert not (db_dir / fodb.STATE_FILE).exists()


def _view_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIFTYONE_DATABASE_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env["GLDBOXES_DB_DIR"] = str(tmp_path / "unused")
    return env


def _gone(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for ``pids`` to exit; return those still running (zombies: gone)."""
    import psutil

    def running(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if running(p)]


@pytest.mark.server
@pytest.mark.slow
class TestKilledCommand:
    def test_kill_9_takes_mongod_and_app_along_and_rerun_works(self, tmp_path: Path) -> None:
        """``kill -9`` of ``view app`` (same serving code as ``--launch``): no orphan stays on
        its ports, and the same command on the same ports and data folder works again."""
        import psutil

        port = fodb.free_port()
        args = ["view", "app", "--db-dir", str(tmp_path / "db"), "--port", str(port)]
        env = _view_env(tmp_path)
        first = _Child(args, env)
        spawned: list[int] = []
        try:
            first.wait_for(r"FiftyOne App: http://127\.0\.0\.1:\d+", 180)
            kids = psutil.Process(first.proc.pid).children(recursive=True)
            spawned = [p.pid for p in kids]
            cmds = [" ".join(p.cmdline()) for p in kids]
            assert any("mongod" in c for c in cmds), cmds
            assert any("fiftyone.server.main" in c for c in cmds), cmds
            mongo_port = json.loads((tmp_path / "db" / fodb.STATE_FILE).read_text())["port"]

            first.proc.kill()
            first.proc.wait(timeout=10)
            left = _gone(spawned, timeout=15)
            assert not left, f"still running after kill -9 of their parent: {left} {cmds}"
            # the listeners close with their processes (allow for a loaded machine)
            deadline = time.monotonic() + 15
            while (_port_open(port) or _port_open(mongo_port)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _port_open(port), f"App port {port} still open"
            assert not _port_open(mongo_port), f"mongod port {mongo_port} still open"

            second = _Child(args, env)
            try:
                second.wait_for(r"FiftyOne App: http://127\.0\.0\.1:\d+", 180)
                with urllib.request.urlopen(f"http://127.0.0.1:{port}", timeout=10) as resp:
                    assert resp.status == 200
                second.proc.send_signal(signal.SIGINT)
                assert second.proc.wait(timeout=60) == 0, second.output()
            finally:
                if second.proc.poll() is None:
                    second.proc.kill()
                    second.proc.wait(timeout=10)
        finally:
            if first.proc.poll() is None:
                first.proc.kill()
            for pid in _gone(spawned, timeout=0):  # never leave our servers behind
                os.kill(pid, signal.SIGKILL)

    def test_orphan_without_death_signal_is_stopped_on_next_start(self, tmp_path: Path) -> None:
        """A mongod started off the main thread gets no death signal and outlives its command;
        the next start on its folder stops it (its owner is dead) instead of reusing it."""
        db = tmp_path / "db"
        code = (
            "import sys, threading, time\n"
            "from gldboxes import fodb\n"
            "out = []\n"
            "t = threading.Thread(target=lambda: out.append(fodb.start_mongod(sys.argv[1])))\n"
            "t.start(); t.join()\n"
            "print(out[0].process.pid, flush=True)\n"
            "time.sleep(600)\n"
        )
        env = _view_env(tmp_path)
        owner = subprocess.Popen(
            [sys.executable, "-c", code, str(db)], cwd=REPO, env=env, stdout=subprocess.PIPE
        )
        orphan = 0
        try:
            assert owner.stdout is not None
            orphan = int(owner.stdout.readline())
            owner.kill()
            owner.wait(timeout=10)
            assert _gone([orphan], timeout=1) == [orphan], "off the main thread: no death signal"
            server = fodb.start_mongod(db)
            try:
                assert server.owned and server.process is not None
                assert server.process.pid != orphan and server.alive()
                assert not _gone([orphan], timeout=0)
                state = json.loads((db / fodb.STATE_FILE).read_text())
                assert (state["pid"], state["owner_pid"]) == (server.process.pid, os.getpid())
            finally:
                server.stop()
        finally:
            if owner.poll() is None:
                owner.kill()
            for pid in _gone([orphan] if orphan else [], timeout=0):
                os.kill(pid, signal.SIGKILL)
