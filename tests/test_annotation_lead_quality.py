"""A campaign lead's quality tools against a real Label Studio server, through the CLI.

Gold filtering in ``annotate export``, overlap set on import, ``annotate import
--refresh-predictions`` and ``annotate progress --watch``. One server for the module (started
from the cached migrated template, ``tests/ls_server.py``).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ls_server
import numpy as np
import pytest
import requests

from annotation import campaign, server
from gldboxes.boxes import Box, read_boxes_csv, write_boxes_csv
from gldboxes.cli.main import main as cli_main

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


@pytest.fixture(scope="module")
def ls(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[server.ServerSettings]:
    data_dir = tmp_path_factory.mktemp("ls") / "data"
    with ls_server.running_server(data_dir, document_root=world) as conf:
        yield conf


@pytest.fixture(scope="module")
def raters(ls: server.ServerSettings) -> tuple[campaign.Rater, campaign.Rater]:
    return (
        campaign.add_rater(ls.url, ls.token, "good@gldboxes.test", "Good-Rater-pw-1"),
        campaign.add_rater(ls.url, ls.token, "sloppy@gldboxes.test", "Sloppy-Rater-pw-2"),
    )


@pytest.fixture()
def env(ls: server.ServerSettings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The admin token in the environment (for in-process CLI calls and subprocesses)."""
    monkeypatch.setenv(server.TOKEN_ENV, ls.token)
    return {**os.environ, server.TOKEN_ENV: ls.token, "TQDM_DISABLE": "1"}


def _edges(b: Box) -> tuple[float, float, float, float]:
    return (b.ymin, b.xmin, b.ymax, b.xmax)


def _split(world: Path, rows: slice, path: Path) -> list[campaign.ImageItem]:
    """A split CSV ``id,url,landmark_id`` of some training images of the world."""
    with open(world / "train" / "train.csv", newline="") as fh:
        chosen = list(csv.DictReader(fh))[rows]
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=["id", "url", "landmark_id"])
        wr.writeheader()
        wr.writerows(chosen)
    return campaign.read_split(path, world / "train")


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    capsys.readouterr()
    assert cli_main(["annotate", *args]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def _new_project(ls: server.ServerSettings, world: Path, title: str) -> int:
    client = campaign.connect(ls.url, ls.token)
    return campaign.create_campaign(client, title=title, image_dir=world / "train" / "images")


def _tasks(ls: server.ServerSettings, pid: int) -> list[dict[str, Any]]:
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {ls.token}"
    ids = campaign.existing_task_ids(ls.url, ls.token, pid)
    return [sess.get(f"{ls.url}/api/tasks/{tid}", timeout=60).json() for tid in ids.values()]


def test_export_drops_the_rater_who_fails_gold(
    ls: server.ServerSettings,
    world: Path,
    raters: tuple[campaign.Rater, campaign.Rater],
    env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two gold tasks; the sloppy rater misses both. The exported boxes are the good rater's
    exactly (not the mean of both), the counts say who and what was dropped, and an image only
    the sloppy rater boxed is in removed.csv as ``gold_failed``."""
    items = _split(world, slice(0, 8), tmp_path / "split.csv")
    gt = campaign.best_boxes(read_boxes_csv(world / "train" / "boxes.csv"))
    boxed = [it for it in items if it.id in gt]
    assert len(boxed) >= 6
    gold_ids = [boxed[0].id, boxed[1].id]
    write_boxes_csv(tmp_path / "gold.csv", {k: [gt[k]] for k in gold_ids}, with_score=False)
    pid = _new_project(ls, world, "gold filter")
    conn = ["--url", ls.url, "--data-dir", str(ls.data_dir), "--project", str(pid)]
    imp = _cli(
        capsys,
        "import",
        *conn,
        "--split",
        str(tmp_path / "split.csv"),
        "--image-root",
        str(world / "train"),
        "--document-root",
        str(world),
        "--gold",
        str(tmp_path / "gold.csv"),
        "--overlap",
        "0.5",
    )
    assert imp["added"] == len(items)
    # overlap: half of the new tasks (seed 0) and the gold tasks go to two raters, the rest to one
    chosen = {items[k].id for k in np.random.default_rng(0).permutation(len(items))[:4]}
    listed = {t["data"]["gld_id"]: t for t in _tasks(ls, pid)}
    two = {k for k, t in listed.items() if t["overlap"] == 2}
    assert two == chosen | set(gold_ids) and len(two) > 4
    assert all(t["overlap"] == 1 for k, t in listed.items() if k not in two)
    assert all(bool(t["data"]["overlap"]) == (k in two) for k, t in listed.items())

    tids = campaign.existing_task_ids(ls.url, ls.token, pid)
    good, sloppy = raters
    cg, cs = campaign.connect(ls.url, good.token), campaign.connect(ls.url, sloppy.token)
    w, h = items[0].width, items[0].height
    good_box: dict[str, tuple[float, float, float, float]] = {}
    for it in boxed[:5]:  # the good rater: the true box on gold, a tight box elsewhere
        g = _edges(gt[it.id])
        good_box[it.id] = g
        cg.annotations.create(id=tids[it.id], result=[ls_server.rect(g, w, h)])
    far = (0.0, 0.0, 0.1, 0.1)
    for it in boxed[:5]:  # the sloppy rater: far off on gold, close (IoU >= 0.5) elsewhere
        g = np.array(_edges(gt[it.id]))
        near = tuple(np.clip(g + 0.02 * (g[2] - g[0]), 0, 1))
        cs.annotations.create(
            id=tids[it.id], result=[ls_server.rect(far if it.id in gold_ids else near, w, h)]
        )
    alone = boxed[5].id
    cs.annotations.create(id=tids[alone], result=[ls_server.rect((0.2, 0.2, 0.7, 0.7), w, h)])

    res = _cli(capsys, "export", *conn, "--out", str(tmp_path / "out"))
    boxes = {k: _edges(v[0]) for k, v in read_boxes_csv(res["boxes"]).items()}
    assert sorted(boxes) == sorted(good_box)
    for key, b in boxes.items():
        np.testing.assert_allclose(b, good_box[key], atol=1e-9)
    g = res["gold_filter"]
    assert g["raters_dropped"] == [
        {"rater": sloppy.email, "accuracy": 0.0, "answered": 2, "weight": 0.0}
    ]
    assert (g["raters_judged"], g["boxes_dropped"], g["images_affected"]) == (2, 6, 6)
    with open(res["removed"], newline="") as fh:
        removed = {r["id"]: (r["status"], r["reason"]) for r in csv.DictReader(fh)}
    assert removed[alone] == (
        "gold_failed",
        f"only raters below the gold threshold: {sloppy.email}",
    )
    assert json.loads(Path(res["summary"]).read_text())["gold_filter"] == g

    # the same snapshot without the gold filter averages the sloppy rater in
    snap = res["snapshot"]
    kept = _cli(
        capsys,
        "filter",
        "--snapshot",
        snap,
        "--out",
        str(tmp_path / "all"),
        "--min-gold-accuracy",
        "0",
    )
    mixed = {k: _edges(v[0]) for k, v in read_boxes_csv(kept["boxes"]).items()}
    assert kept["gold_filter"]["raters_dropped"] == [] and alone in mixed
    moved = [k for k in good_box if k not in gold_ids]
    assert all(np.abs(np.subtract(mixed[k], good_box[k])).max() > 1e-3 for k in moved)


def test_reimport_refreshes_predictions(
    ls: server.ServerSettings,
    world: Path,
    raters: tuple[campaign.Rater, campaign.Rater],
    env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A second import with new boxes and --refresh-predictions: same tasks, one prediction each,
    of the new model version and box; the annotation made meanwhile is untouched. Without the
    flag a re-import leaves the predictions alone."""
    items = _split(world, slice(8, 12), tmp_path / "split.csv")
    v1 = {it.id: [Box(0.1, 0.1, 0.5, 0.5, 0.4)] for it in items}
    v2 = {it.id: [Box(0.2, 0.3, 0.8, 0.9, 0.8)] for it in items[:3]}  # one image keeps v1
    write_boxes_csv(tmp_path / "v1.csv", v1, with_score=True)
    write_boxes_csv(tmp_path / "v2.csv", v2, with_score=True)
    pid = _new_project(ls, world, "refresh predictions")
    base = [
        "import",
        "--url",
        ls.url,
        "--data-dir",
        str(ls.data_dir),
        "--project",
        str(pid),
        "--split",
        str(tmp_path / "split.csv"),
        "--image-root",
        str(world / "train"),
        "--document-root",
        str(world),
        "--overlap",
        "0",
    ]
    first = _cli(capsys, *base, "--predictions", str(tmp_path / "v1.csv"), "--model-version", "v1")
    assert first["added"] == 4
    tids = campaign.existing_task_ids(ls.url, ls.token, pid)
    good, _ = raters
    w, h = items[0].width, items[0].height
    human = [ls_server.rect((0.05, 0.05, 0.95, 0.95), w, h)]
    campaign.connect(ls.url, good.token).annotations.create(id=tids[items[0].id], result=human)

    same = _cli(capsys, *base, "--predictions", str(tmp_path / "v2.csv"), "--model-version", "v2")
    assert (same["added"], same["skipped"]) == (0, 4)
    assert {p["model_version"] for t in _tasks(ls, pid) for p in t["predictions"]} == {"v1"}

    again = _cli(
        capsys,
        *base,
        "--predictions",
        str(tmp_path / "v2.csv"),
        "--model-version",
        "v2",
        "--refresh-predictions",
    )
    assert (again["added"], again["skipped"], again["refreshed"]) == (0, 4, 3)
    assert cli_main(["annotate", *base, "--refresh-predictions"]) == 2  # nothing to refresh with
    tasks = {t["data"]["gld_id"]: t for t in _tasks(ls, pid)}
    assert campaign.existing_task_ids(ls.url, ls.token, pid) == tids  # no task added
    for it in items:
        preds = tasks[it.id]["predictions"]
        want, version = (v2, "v2") if it.id in v2 else (v1, "v1")
        assert [p["model_version"] for p in preds] == [version], it.id
        v = preds[0]["result"][0]["value"]
        b = want[it.id][0]
        np.testing.assert_allclose(
            [v["y"], v["x"], v["y"] + v["height"], v["x"] + v["width"]],
            [100 * b.ymin, 100 * b.xmin, 100 * b.ymax, 100 * b.xmax],
            atol=1e-6,
        )
        assert preds[0]["score"] == pytest.approx(b.score)
    anns = tasks[items[0].id]["annotations"]
    assert len(anns) == 1 and anns[0]["result"][0]["value"] == human[0]["value"]
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {ls.token}"
    assert sess.get(f"{ls.url}/api/projects/{pid}", timeout=60).json()["model_version"] == "v2"


def _watch(ls: server.ServerSettings, pid: int, env: dict[str, str], *extra: str) -> Any:
    cmd = [sys.executable, "-m", "gldboxes", "annotate", "progress", "--url", ls.url]
    return subprocess.Popen(
        [*cmd, "--data-dir", str(ls.data_dir), "--project", str(pid), "--watch", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_progress_watch(
    ls: server.ServerSettings,
    world: Path,
    raters: tuple[campaign.Rater, campaign.Rater],
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    """``progress --watch --count 3``: boxes submitted after the first line show up as the
    rater's boxes/hour over the window and give an ETA; Ctrl-C ends a watch cleanly (exit 0,
    no traceback); a finished campaign prints one line and stops."""
    items = _split(world, slice(12, 18), tmp_path / "split.csv")
    pid = _new_project(ls, world, "progress watch")
    client = campaign.connect(ls.url, ls.token)
    campaign.import_images(
        client, url=ls.url, token=ls.token, project_id=pid, items=items, document_root=world
    )
    tids = campaign.existing_task_ids(ls.url, ls.token, pid)
    good, sloppy = raters
    cg, cs = campaign.connect(ls.url, good.token), campaign.connect(ls.url, sloppy.token)
    w, h = items[0].width, items[0].height
    box = [ls_server.rect((0.2, 0.2, 0.6, 0.6), w, h)]
    cg.annotations.create(id=tids[items[0].id], result=box)

    # the three annotations below have ~8 s (two intervals) to land before the third line
    proc = _watch(ls, pid, env, "--interval", "4", "--count", "3")
    try:
        assert proc.stdout is not None
        line1 = json.loads(proc.stdout.readline())
        for it in items[1:3]:  # after the first line: two boxes by the good rater
            cg.annotations.create(id=tids[it.id], result=box)
        cs.annotations.create(id=tids[items[3].id], result=[], was_cancelled=True)
        line2, line3 = (json.loads(proc.stdout.readline()) for _ in range(2))
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
    assert (line1["tasks"], line1["tasks_done"], line1["window_s"]) == (6, 1, 0.0)
    assert line1["eta_s"] is None and line1["raters"][good.email]["boxes_per_hour"] == 0.0
    assert (line3["tasks"], line3["tasks_done"]) == (6, 3)
    assert 4.0 <= line2["window_s"] < line3["window_s"]
    per_hour = 3600.0 / line3["window_s"]
    assert line3["raters"][good.email] == {
        "boxes": 3,
        "submitted": 3,
        "boxes_per_hour": pytest.approx(2 * per_hour),
        "submitted_per_hour": pytest.approx(2 * per_hour),
    }
    assert line3["raters"][sloppy.email]["boxes_per_hour"] == 0.0  # a skip is not a box
    assert line3["tasks_per_hour"] == pytest.approx(2 * per_hour)
    assert line3["eta_s"] == pytest.approx(3 / (2 * per_hour) * 3600)

    proc = _watch(ls, pid, env, "--interval", "60")
    try:
        assert proc.stdout is not None and json.loads(proc.stdout.readline())["tasks_done"] == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()

    for it in items[3:]:
        cg.annotations.create(id=tids[it.id], result=box)
    proc = _watch(ls, pid, env, "--interval", "60")
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == 1 and lines[0]["tasks_done"] == lines[0]["tasks"] == 6
    assert lines[0]["eta_s"] == 0.0
