"""Every command block of README.md runs as written, or is listed here with why not.

The README cannot drift again: each fenced ``bash`` block is split into commands (continuation
lines joined, comments stripped) and

* run as written, in README order, from one temporary working directory in which ``.venv``
  links to the repository's ``.venv`` (later blocks use what earlier ones wrote, as a user's
  session would); the only help is an environment variable the README documents
  (``GLDBOXES_GLDV2_BASE_URL`` pointing at a GLDv2 mirror on 127.0.0.1, ``GLDBOXES_DB_DIR``)
  and ``.venv/bin`` on the ``PATH`` (an activated environment, for the bare ``gldboxes``
  after ``pip install``); or
* listed in :data:`COVERAGE` with the reason it cannot run here and checked another way (the
  exact arguments parse with the real parser, ``make -n``, the test that runs the same mode); or
* run as written by another test, which must still reference the command.

A block in none of these fails :func:`test_every_block_is_covered`, naming its first line.
Separately, every ``gldboxes <cmd> [<sub>]`` named anywhere in the README has its ``--help``
run, and every ``--flag`` the README passes to it must appear there.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from fault_server import FaultServer
from test_gld_download import make_tar

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
GLDBOXES = REPO / ".venv" / "bin" / "gldboxes"
TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- README parsing
@dataclass(frozen=True)
class Block:
    """One fenced ``bash`` block of the README: its first line's number and its commands."""

    line: int
    commands: tuple[str, ...]

    @property
    def first(self) -> str:
        """The block's first command: its key in :data:`COVERAGE`."""
        return self.commands[0]


def strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` outside quotes after a blank)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def split_commands(lines: list[str]) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    commands: list[str] = []
    current = ""
    for raw in lines:
        line = strip_comment(raw.strip())
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        current += line
        if current.strip():
            commands.append(" ".join(current.split()) if "'" not in current else current.strip())
        current = ""
    if current.strip():
        commands.append(current.strip())
    return commands


def readme_blocks(text: str) -> list[Block]:
    """Every fenced ``bash`` block of ``text`` (indented ones inside lists too), in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            commands = split_commands(lines[start:j])
            if commands:
                blocks.append(Block(line=start + 1, commands=tuple(commands)))
            i = j
        i += 1
    return blocks


def readme_gldboxes_calls(text: str, commands: frozenset[str]) -> list[tuple[str, ...]]:
    """Token lists of every ``gldboxes ...`` call in the README (block commands and code
    spans), and of code spans that start with one of ``commands`` (``detect train ...``)."""
    calls: list[tuple[str, ...]] = []
    sources = [c for b in readme_blocks(text) for c in b.commands]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = [" ".join(s.split()) for s in re.findall(r"`([^`]+)`", prose)]
    sources += [f"gldboxes {s}" if s.split(" ", 1)[0] in commands else s for s in spans]
    for src in sources:
        try:
            tokens = [t.strip("[]") for t in shlex.split(src)]
        except ValueError:
            tokens = src.split()
        for k, tok in enumerate(tokens):
            if tok in ("gldboxes", ".venv/bin/gldboxes"):
                rest: list[str] = []
                for t in tokens[k + 1 :]:
                    if t in ("|", "||", "&&", ";") or t in ("gldboxes", ".venv/bin/gldboxes"):
                        break
                    rest.append(t)
                calls.append(tuple(rest))
    return calls


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _resolve(
    parser: argparse.ArgumentParser, words: list[str], prefix: tuple[str, ...]
) -> list[tuple[str, ...]]:
    """The command paths ``words`` name below ``parser`` (``a|b`` names both; an unknown word
    is kept, so that its ``--help`` fails the test naming it)."""
    subs = _subparsers(parser)
    if not subs:
        return [prefix]
    if not words or words[0] == "..." or words[0].startswith("<"):
        return []  # "gldboxes retrieval ..." names the group only
    out: list[tuple[str, ...]] = []
    for alt in words[0].split("|"):
        path = (*prefix, alt)
        out += _resolve(subs[alt], words[1:], path) if alt in subs else [path]
    return out


def command_flags(text: str) -> dict[tuple[str, ...], set[str]]:
    """``{command path: {--flags the README passes to it}}`` for every call in ``text``."""
    from gldboxes.cli.main import build_parser

    root = build_parser()
    out: dict[tuple[str, ...], set[str]] = {}
    for call in readme_gldboxes_calls(text, frozenset(_subparsers(root))):
        words = [t for t in call if not t.startswith("-")]
        if not words:
            continue  # a global option only
        flags = {t.split("=", 1)[0] for t in call if t.startswith("--")}
        for name in _resolve(root, words, ()):
            out.setdefault(name, set()).update(flags)
    return out


# ----------------------------------------------------------------------------- the session
@dataclass
class Session:
    """The temporary working directory every block runs in, and its environment."""

    cwd: Path
    env: dict[str, str]
    mirror_ids: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)

    def run(self, command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as written with bash; fail with its output if it fails."""
        if "--launch" in command:
            return self._run_launch(command, timeout)
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        self.log.append(f"{time.monotonic() - t0:6.1f} s  {command}")
        assert proc.returncode == 0, (
            f"README command failed (exit {proc.returncode}): {command}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
        )
        return proc

    def _run_launch(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """A ``--launch`` command serves until Ctrl-C: wait for the URL it prints, check the
        App answers there, then press Ctrl-C (SIGINT) and expect a clean exit."""
        port = int(shlex.split(command)[shlex.split(command).index("--port") + 1])
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is busy; the README command needs it free: {command}")
        t0 = time.monotonic()
        out_path, err_path = self.cwd / ".launch.out", self.cwd / ".launch.err"
        with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.cwd,
                env=self.env,
                stdout=out_f,
                stderr=err_f,
                text=True,
                start_new_session=True,
            )
        try:
            url = None
            while time.monotonic() - t0 < timeout and proc.poll() is None and url is None:
                said = re.search(r"FiftyOne App: (\S+) +\(Ctrl-C to stop\)", out_path.read_text())
                url = said.group(1) if said else None
                time.sleep(0.3)
            assert url is not None, (proc.poll(), out_path.read_text(), err_path.read_text())
            assert url.startswith(f"http://127.0.0.1:{port}"), url
            assert requests.get(url, timeout=30).status_code == 200
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out, err = out_path.read_text(), err_path.read_text()
        self.log.append(f"{time.monotonic() - t0:6.1f} s  {command}")
        assert proc.returncode == 0, (proc.returncode, err[-3000:])  # Ctrl-C: a clean stop
        return subprocess.CompletedProcess(command, proc.returncode, out, err)


def gldv2_mirror(seed_dir: Path) -> tuple[dict[str, bytes], list[str]]:
    """A GLDv2-layout mirror (10 train tar shards + md5 lists + metadata) of a tiny world's
    training images; ``metadata/train.csv`` lists ``id,url,landmark_id`` with the images also
    served one by one (``photos/<id>.jpg``), as GLDv2's own list points at the originals.
    URLs are relative to the mirror root: ``{base}`` is replaced once the port is known."""
    from gldboxes.gld import GLDV2_METADATA, image_relpath
    from gldboxes.synth import confs, generate_world

    world = generate_world(seed_dir, confs["tiny"])
    rows = _csv_rows(world / "train" / "train.csv")
    files: dict[str, bytes] = {}
    shards: list[dict[str, bytes]] = [{} for _ in range(10)]
    for k, row in enumerate(rows):
        data = (world / "train" / row["url"]).read_bytes()
        shards[k % 10][image_relpath(row["id"])] = data
        files[f"photos/{row['id']}.jpg"] = data
    for s, members in enumerate(shards):
        name = f"images_{s:03d}.tar"
        files[f"train/{name}"] = tar = make_tar(members)
        md5 = hashlib.md5(tar).hexdigest()
        files[f"md5sum/train/md5.images_{s:03d}.txt"] = f"{md5}  {name}\n".encode()
    for rel in GLDV2_METADATA["train"]:
        files[rel] = b"id,landmark_id\n"
    listing = "".join(f"{r['id']},{{base}}photos/{r['id']}.jpg,{r['landmark_id']}\n" for r in rows)
    files["metadata/train.csv"] = ("id,url,landmark_id\n" + listing).encode()
    return files, [r["id"] for r in rows]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """One working directory for every block, in README order."""
    if not GLDBOXES.exists():
        pytest.fail(f"{GLDBOXES} is missing: run `make test` (it creates .venv)")
    root = tmp_path_factory.mktemp("readme")
    cwd = root / "work"
    cwd.mkdir()
    (cwd / ".venv").symlink_to(REPO / ".venv")
    env = {
        **os.environ,
        "PATH": f"{cwd / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "GLDBOXES_DB_DIR": str(root / "mongodb"),
    }
    for var in ("RAY_ADDRESS", "GLDBOXES_GLDV2_BASE_URL"):
        env.pop(var, None)
    sess = Session(cwd=cwd, env=env)
    yield sess
    print("\n".join(["README commands, wall time each:", *sess.log]))


@pytest.fixture(scope="module")
def mirror(session: Session, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultServer]:
    """A GLDv2 mirror on 127.0.0.1 behind the README's ``GLDBOXES_GLDV2_BASE_URL``, for the
    blocks marked ``server``."""
    files, ids = gldv2_mirror(tmp_path_factory.mktemp("mirror") / "world")
    with FaultServer({k: v for k, v in files.items() if k != "metadata/train.csv"}) as srv:
        listing = files["metadata/train.csv"].decode().replace("{base}", srv.base_url)
        srv.add_file("metadata/train.csv", listing.encode())
        session.env["GLDBOXES_GLDV2_BASE_URL"] = srv.base_url
        session.mirror_ids = ids
        yield srv
        session.env.pop("GLDBOXES_GLDV2_BASE_URL")


# ----------------------------------------------------------------------------- checks
def _one(pattern: str, cwd: Path) -> Path:
    found = sorted(cwd.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_synth(s: Session, outputs: list[str]) -> None:
    """The tiny world: 48 database images + 6 queries; the codebook world has its own images."""
    assert len(list((s.cwd / "runs/world/retrieval/jpg").glob("*.jpg"))) == 54
    assert len(_csv_rows(s.cwd / "runs/world/train/train.csv")) == 48
    assert len(list((s.cwd / "runs/world-cb/train/images").rglob("*.jpg"))) == 48


def check_gld(s: Session, outputs: list[str]) -> None:
    """Every mirrored image arrived, through the shards and through the URL list, and the
    split and the COCO file describe what is on disk."""
    shards = {p.stem for p in (s.cwd / "data/gldv2/train/images").rglob("*.jpg")}
    assert shards == set(s.mirror_ids)
    urls = {p.stem for p in (s.cwd / "data/gldv1/images").rglob("*.jpg")}
    assert urls == set(s.mirror_ids)
    split = _one("data/split/split-*", s.cwd)
    train, val = _csv_rows(split / "train.csv"), _csv_rows(split / "val.csv")
    assert train and val and not {r["id"] for r in train} & {r["id"] for r in val}
    coco = json.loads((s.cwd / "runs/world/train/boxes.json").read_text())
    boxes = _csv_rows(s.cwd / "runs/world/train/boxes.csv")
    assert len(coco["annotations"]) == len(boxes) > 0
    assert all(im["width"] == 320 or im["height"] == 320 for im in coco["images"])


def check_detect(s: Session, outputs: list[str]) -> None:
    """AP@0.5 was written, the SavedModel exported, and every benchmark image has boxes."""
    run = s.cwd / "runs/det/detector-tiny_cpu-128"
    ev = json.loads(_one("eval/val-step*.json", run).read_text())
    assert 0.0 <= ev["ap50"] <= 1.0, ev
    assert (_one("export-step*", run) / "saved_model.pb").exists()
    rows = _csv_rows(s.cwd / "runs/det/boxes.csv")
    assert {r["id"] for r in rows} == {
        p.stem for p in (s.cwd / "runs/world/retrieval/jpg").iterdir()
    }


def check_retrieval(s: Session, outputs: list[str]) -> None:
    """ASMK* on the tiny world is far above a random ranking (~20% Medium mAP), `evaluate`
    gives the same numbers from the saved ranks, the ablation has its detector rows at both
    thresholds, and R-MAC its row."""
    run = json.loads(
        _one("runs/ret/results/asmk_star-k256-*-synth/metrics.json", s.cwd).read_text()
    )
    medium = 100 * run["metrics"]["medium"]["mAP"]
    assert medium > 50, run["metrics"]["medium"]
    row = next(ln for ln in outputs[3].splitlines() if ln.startswith("| ranks |"))
    assert float(row.split("|")[6]) == pytest.approx(medium, abs=0.006), row
    rows = _csv_rows(s.cwd / "runs/ret/ablation/ablation.csv")
    assert {r["method"] for r in rows} == {"asmk_star", "r_asmk_star", "d2r_max"}
    detector = {(r["method"], r["setting"]) for r in rows if r["source"] == "detector"}
    assert {("d2r_max", "0.1"), ("d2r_max", "0.3")} <= detector, detector
    assert "| rmac+aml+qe |" in outputs[2], outputs[2][-2000:]


def check_gldv2_benchmark(s: Session, outputs: list[str]) -> None:
    """The exported GLDv2 benchmark is scored, and the submission scores the same."""
    rows = [ln for ln in outputs[-2].splitlines() if "| mAP@100 |" in ln]
    again = [ln for ln in outputs[-1].splitlines() if "| mAP@100 |" in ln]
    assert rows and again, (outputs[-2][-2000:], outputs[-1][-2000:])
    assert rows[0].split("|")[3:] == again[0].split("|")[3:], (rows, again)
    assert float(rows[0].split("|")[5].split()[0]) > 50, rows


def check_growing_index(s: Session, outputs: list[str]) -> None:
    """The photo index is built, loses the two removed queries, answers with a report, scores
    the hand-written ground truth far above random, then grows by a second folder."""
    assert "54 photos in 1 parts" in outputs[1], outputs[1][-2000:]
    assert "removed 2 photos" in outputs[2], outputs[2][-2000:]
    assert (s.cwd / "runs/photos-report/index.html").stat().st_size > 1000
    row = next(ln for ln in outputs[5].splitlines() if ln.startswith("| asmk_star"))
    assert float(row.split("|")[6]) > 50, row  # Medium mAP
    assert "100 photos in 2 parts" in outputs[6], outputs[6][-2000:]


def check_distractors(s: Session, outputs: list[str]) -> None:
    """The run with the 54 generated distractors says so (``+54``), and at K=256 none of them
    outscores a positive: the metrics equal the plain run's, as the README says."""
    assert "54 images" in outputs[1] and "synth+54" in outputs[1], outputs[1][-2000:]
    plain = json.loads(
        _one("runs/ret/results/asmk_star-k256-*-synth/metrics.json", s.cwd).read_text()
    )
    more = _one("runs/ret/results/asmk_star-k256-*-synth+54-*/metrics.json", s.cwd)
    with_d = json.loads(more.read_text())
    for p in ("easy", "medium", "hard"):
        assert with_d["metrics"][p]["mAP"] == plain["metrics"][p]["mAP"], p
    ranks = np.load(more.parent / "ranks.npy")
    assert ranks.max() >= 48  # distractor ids follow the 48 database images


def check_views(s: Session, outputs: list[str]) -> None:
    """The App served the boxes dataset on the README's port and stopped on Ctrl-C (the port
    is free again); detections and retrieval built their datasets, retrieval its query views."""
    boxes = re.search(r"dataset '[^']+': (\d+) samples", outputs[0])
    assert boxes is not None and int(boxes.group(1)) == 48, outputs[0][-2000:]
    assert "FiftyOne App: http://127.0.0.1:5151" in outputs[0], outputs[0][-2000:]
    assert "stopping the FiftyOne App" in outputs[0], outputs[0][-2000:]
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", 5151)) != 0, "the App still listens after Ctrl-C"
    det = re.search(r"dataset '[^']+': (\d+) samples", outputs[1])
    assert det is not None and int(det.group(1)) >= 48, outputs[1][-2000:]
    assert re.search(r"saved views: .*query-0-lm000-query0", outputs[2]), outputs[2][-2000:]
    assert "n_queries=6, n_query_views=6" in outputs[2], outputs[2][-2000:]


def check_cluster(s: Session, outputs: list[str]) -> None:
    """The local-Ray run gives the serial run's rankings, and the Ray download every image."""
    serial = np.load(_one("runs/ret/results/asmk_star-k256-*-synth/ranks.npy", s.cwd))
    ray = np.load(_one("runs/ret-ray/results/asmk_star-k256-*-synth/ranks.npy", s.cwd))
    np.testing.assert_array_equal(serial, ray)
    shards = {p.stem for p in (s.cwd / "data/gldv2/train/images").rglob("*.jpg")}
    assert shards == set(s.mirror_ids)


def parse_exactly(command: str) -> argparse.Namespace:
    """The README command's arguments, parsed by the real ``gldboxes`` parser (flags, choices
    and types checked; nothing runs)."""
    from gldboxes.cli.main import build_parser

    args = shlex.split(command)
    assert args[0] in ("gldboxes", ".venv/bin/gldboxes"), command
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args[1:])
    except SystemExit as exc:  # argparse's error
        said = err.getvalue().strip().splitlines()[-1:]
        raise AssertionError(f"README command does not parse: {command}: {said}") from exc


def check_parses(block: Block) -> None:
    for command in block.commands:
        parse_exactly(command)


def parses_and_run_by(test: str, marker: str) -> Callable[[Block], None]:
    """Check: the block's commands parse exactly, and ``test`` (under tests/) runs that mode
    (it contains ``marker``)."""

    def check(block: Block) -> None:
        check_parses(block)
        assert marker in (TESTS / test).read_text(), f"{test} no longer has {marker!r}"

    return check


def check_make(block: Block) -> None:
    """``make -n`` shows what ``make demo`` / ``make test`` would run; the demo's pipeline
    command parses."""
    demo = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert "scripts/setup.sh" in demo.stdout
    line = next(x for x in demo.stdout.splitlines() if "gldboxes pipeline" in x)
    assert parse_exactly(line.strip()).out == "runs/demo"
    test = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    for tool in ("ruff check", "ruff format --check", "mypy", "pytest"):
        assert f".venv/bin/{tool}" in test.stdout, (tool, test.stdout)


def check_ray_token(block: Block) -> None:
    """This Ray has ``ray get-auth-token``, and the token recipe is run by test_executor's
    ``ray start --head`` test; the export line sets the variables gldboxes reads."""
    ray = REPO / ".venv" / "bin" / "ray"
    proc = subprocess.run([str(ray), "get-auth-token", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    export = next(c for c in block.commands if c.startswith("export "))
    assigned = {a.split("=", 1)[0] for a in shlex.split(export)[1:]}
    assert assigned == {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, assigned
    executor = "".join(
        (REPO / "gldboxes" / f).read_text() for f in ("executor.py", "executor_ray.py")
    )
    assert all(f'"{v}"' in executor for v in assigned)
    head = (TESTS / "test_executor.py").read_text()
    assert '"start", "--head"' in head and "def test_real_case_readme_recipe" in head


def check_pip_ray(command: str) -> None:
    """``pip install "gldboxes[ray]"``: the extra exists and asks for Ray's data library."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = command.split("[", 1)[1].split("]", 1)[0]
    deps = meta["project"]["optional-dependencies"][extra]
    assert any(d.replace(" ", "").startswith("ray[data]>=2.50") for d in deps), deps


# ----------------------------------------------------------------------------- coverage
@dataclass(frozen=True)
class Run:
    """Run every command of the block as written, then ``check`` what it wrote.
    ``skip`` maps a command to why it cannot run here and the check standing in for it."""

    check: Callable[[Session, list[str]], None]
    server: bool = False
    skip: dict[str, tuple[str, Callable[[str], None]]] = field(default_factory=dict)
    timeout: float = 600


@dataclass(frozen=True)
class Listed:
    """Cannot run here for ``reason``; ``check`` checks it another way."""

    reason: str
    check: Callable[[Block], None]


@dataclass(frozen=True)
class OtherTest:
    """Run as written by ``test`` (a file under tests/), which references ``marker``: a part
    of one of the block's commands, or, with ``heading``, the README heading whose first
    ``bash`` block it runs."""

    test: str
    marker: str
    heading: str | None = None


#: Every README block by its first command (comments stripped, continuation lines joined).
COVERAGE: dict[str, Run | Listed | OtherTest] = {
    "make demo": Listed(
        "installs .venv and runs the 6-minute demo; `make test` is the whole suite itself",
        check_make,
    ),
    ".venv/bin/gldboxes retrieval download roxford5k --out data/": Listed(
        "real data from the internet (the Oxford and Paris images, ~6 GB) and K=65,536 words, "
        "which need the real descriptors; the download is run against a local server by "
        "test_datasets.py",
        parses_and_run_by("test_datasets.py", "def _download_argv"),
    ),
    ".venv/bin/gldboxes pipeline --preset paper --out runs/paper-ox --dataset data/roxford5k "
    "--codebook-dataset data/rparis6k --detector models/d2r_frcnn_20190131 --features-model "
    "models/delf_gld_20190411/model --features-pca models/delf_gld_20190411/pca": Listed(
        "needs roxford5k/rparis6k and the released DELF-GLD and Faster R-CNN weights, which the "
        "toolkit cannot fetch; test_pipeline.py::test_real_data_mode runs this mode "
        "(--dataset/--codebook-dataset/--detector) with stand-ins",
        parses_and_run_by("test_pipeline.py", "def test_real_data_mode"),
    ),
    ".venv/bin/gldboxes retrieval ablation --dataset ../shared/data/real/mini_rparis6k --out "
    "runs/real --codebook-images ../shared/data/landmark_photos --no-gt --methods "
    "asmk_star,r_asmk_star,d2r_max --rmac-levels 1,2,3 --ss 1,5,10 --verify": OtherTest(
        "test_real_benchmark.py",
        "retrieval ablation --dataset ../shared/data/real/mini_rparis6k",
    ),
    ".venv/bin/gldboxes synth --out runs/world --preset tiny": Run(check_synth),
    ".venv/bin/gldboxes synth --preset tiny --out runs/world": OtherTest(
        "test_annotation_lead.py",
        '_readme_block("### Annotation campaigns (Label Studio)")',
        heading="### Annotation campaigns (Label Studio)",
    ),
    ".venv/bin/gldboxes download gldv2 --split train --out data/gldv2 --shards 0-9": Run(
        check_gld, server=True
    ),
    ".venv/bin/gldboxes split --csv runs/world/train/train.csv --out runs/split --seed 0": Run(
        check_detect
    ),
    ".venv/bin/gldboxes detect train --records runs/det/records-gld-val10-neg --runs "
    "runs/det-eval --conf tiny_cpu --batch-size 2 --steps 5 --eval-every 2": OtherTest(
        "test_detection_train_eval.py",
        "--conf tiny_cpu --batch-size 2 --steps 5 --eval-every 2",
    ),
    ".venv/bin/gldboxes retrieval run --dataset runs/world/retrieval --out runs/ret --kernel "
    "asmk_star --codebook-size 256 --codebook-images runs/world-cb/train/images": Run(
        check_retrieval
    ),
    ".venv/bin/gldboxes synth --out runs/tiny --preset tiny": Run(check_gldv2_benchmark),
    ".venv/bin/gldboxes synth --out runs/photos-world --preset tiny": Run(check_growing_index),
    ".venv/bin/gldboxes view boxes --boxes runs/world/train/boxes.csv --train-csv "
    "runs/world/train/train.csv --launch --port 5151": Run(check_views, server=True),
    'pip install "gldboxes[ray]"': Run(
        check_cluster,
        server=True,
        skip={
            'pip install "gldboxes[ray]"': (
                "installs from the package index; `make test` installed the extra already",
                check_pip_ray,
            )
        },
    ),
    "gldboxes retrieval download revisitop1m --out data/revisitop1m --engine ray "
    "--task-cpus 0.25": Listed(
        "the real R1M: 100 archives from the internet, indexed on a cluster; "
        "test_distractors.py runs the download against a local server and --distractors runs",
        parses_and_run_by("test_distractors.py", '"retrieval", "download", "revisitop1m"'),
    ),
    ".venv/bin/gldboxes synth --out runs/world-d --preset tiny --seed 7": Run(check_distractors),
    "ray get-auth-token": Listed(
        "needs a Ray head on another machine; test_executor.py starts `ray start --head` on "
        "127.0.0.1 with token auth and runs a stage through RAY_ADDRESS",
        check_ray_token,
    ),
}


def _blocks() -> list[Block]:
    return readme_blocks(README.read_text())


def _params() -> list[object]:
    params: list[object] = []
    for b in _blocks():
        cover = COVERAGE.get(b.first)
        marks = [pytest.mark.slow] if isinstance(cover, Run) else []
        if isinstance(cover, Run) and cover.server:
            marks.append(pytest.mark.server)
        params.append(pytest.param(b, id=f"L{b.line}:{b.first[:60]}", marks=marks))
    return params


# ----------------------------------------------------------------------------- tests
class TestParsing:
    def test_split_commands(self) -> None:
        lines = [
            "a --x 1 \\",
            "    --y 2   # comment",
            "# only a comment",
            "",
            'b "#not a comment" # comment',
        ]
        assert split_commands(lines) == ["a --x 1 --y 2", 'b "#not a comment"']

    def test_new_block_is_named(self) -> None:
        text = README.read_text() + "\n```bash\n.venv/bin/gldboxes synth --out x  # new\n```\n"
        n = len(text.splitlines()) - 1
        assert uncovered(readme_blocks(text)) == [
            f"README.md:{n}: .venv/bin/gldboxes synth --out x"
        ]

    def test_flags_per_command(self) -> None:
        text = (
            "```bash\n.venv/bin/gldboxes split --csv a.csv \\\n    --bogus 1\n```\n"
            "Prose: `gldboxes download gldv2|urls --engine ray`, `detect train ... --steps N`, "
            "`gldboxes retrieval ...`."
        )
        assert command_flags(text) == {
            ("split",): {"--csv", "--bogus"},
            ("download", "gldv2"): {"--engine"},
            ("download", "urls"): {"--engine"},
            ("detect", "train"): {"--steps"},
        }

    def test_blocks_of_the_readme(self) -> None:
        blocks = _blocks()
        assert len(blocks) >= 10
        firsts = [b.first for b in blocks]
        assert "make demo" in firsts and "ray get-auth-token" in firsts  # indented block too
        assert not [c for b in blocks for c in b.commands if c.endswith("\\") or " # " in c]


def uncovered(blocks: list[Block]) -> list[str]:
    """``README.md:LINE: first command`` of each block neither run nor listed."""
    return [f"README.md:{b.line}: {b.first}" for b in blocks if b.first not in COVERAGE]


def test_every_block_is_covered() -> None:
    """A README block nobody runs or lists fails here, by its first line; so does a listed
    block the README no longer has."""
    blocks = _blocks()
    missing = uncovered(blocks)
    assert not missing, "README blocks neither run nor listed in COVERAGE:\n" + "\n".join(missing)
    stale = set(COVERAGE) - {b.first for b in blocks}
    assert not stale, f"COVERAGE lists blocks README.md no longer has: {sorted(stale)}"


@pytest.mark.parametrize("block", _params())
def test_block(block: Block, request: pytest.FixtureRequest) -> None:
    """Each README block: run as written (in README order, one shared working directory),
    or checked another way with the reason it cannot run here."""
    cover = COVERAGE.get(block.first)
    if cover is None:
        pytest.fail(f"README.md:{block.line}: block not covered: {block.first}")
    if isinstance(cover, Listed):
        cover.check(block)
    elif isinstance(cover, OtherTest):
        text = (TESTS / cover.test).read_text()
        assert cover.marker in text, f"{cover.test} no longer runs: {block.first}"
        if cover.heading is None:
            assert any(cover.marker in c for c in block.commands), (cover.marker, block.commands)
        else:  # the test runs the first block under the heading: this one
            readme = README.read_text()
            under = readme_blocks(readme[readme.index(cover.heading) :])
            assert under and under[0].commands == block.commands, cover.heading
    else:
        s: Session = request.getfixturevalue("session")
        if cover.server:
            request.getfixturevalue("mirror")
        outputs: list[str] = []
        for command in block.commands:
            if command in cover.skip:
                cover.skip[command][1](command)
                outputs.append("")
                continue
            proc = s.run(command, timeout=cover.timeout)
            outputs.append(proc.stdout + proc.stderr)
        cover.check(s, outputs)


def _help_params() -> list[object]:
    flags = command_flags(README.read_text())
    return [pytest.param(cmd, sorted(f), id=" ".join(cmd)) for cmd, f in sorted(flags.items())]


@pytest.mark.parametrize(("command", "flags"), _help_params())
def test_help_lists_readme_flags(command: tuple[str, ...], flags: list[str]) -> None:
    """``gldboxes <cmd> [<sub>] --help`` runs, and lists every flag the README passes to it."""
    proc = subprocess.run(
        [str(GLDBOXES), *command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = [
        f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", proc.stdout)
    ]
    assert not missing, f"gldboxes {' '.join(command)}: README flags not in --help: {missing}"
