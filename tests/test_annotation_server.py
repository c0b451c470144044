"""A real Label Studio server: campaign on synthetic-world images, two raters, restart, export.

Also drives the labeling page in headless Chromium (Debian ``chromium``) and submits a
pre-annotated box. The server starts from a cached migrated template (``tests/ls_server.py``).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ls_server
import numpy as np
import pytest
import requests

from annotation import campaign, server
from annotation.export import export_snapshot, load_snapshot, parse_snapshot, progress
from annotation.quality import agreement, decide, filter_boxes, validate, validation_report
from gldboxes.boxes import Box, read_boxes_csv
from gldboxes.cli.main import main as cli_main

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gldboxes.synth import confs, generate_world

    return generate_world(tmp_path_factory.mktemp("world"), confs["tiny"])


@pytest.fixture(scope="module")
def ls(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[server.ServerSettings]:
    data_dir = tmp_path_factory.mktemp("ls") / "data"
    with ls_server.running_server(data_dir, document_root=world) as conf:
        yield conf


def _edges(b: Box) -> tuple[float, float, float, float]:
    return (b.ymin, b.xmin, b.ymax, b.xmax)


def test_campaign_end_to_end(ls: server.ServerSettings, world: Path, tmp_path: Path) -> None:
    url, token = ls.url, ls.token
    client = campaign.connect(url, token)
    train = world / "train"
    items = campaign.read_split(train / "train.csv")[:12]
    gt = campaign.best_boxes(read_boxes_csv(train / "boxes.csv"))
    # pre-annotations: the GT box where there is one, a fixed box otherwise
    preds = {it.id: gt.get(it.id, Box(0.1, 0.1, 0.9, 0.9, 0.3)) for it in items}
    gold_id = items[0].id
    assert gold_id in gt
    pid = campaign.create_campaign(client, title="landmarks e2e", image_dir=train / "images")

    first = campaign.import_images(
        client,
        url=url,
        token=token,
        project_id=pid,
        items=items[:10],
        document_root=world,
        predictions=preds,
        model_version="gt-v1",
        overlap_fraction=0.2,
        gold={gold_id: gt[gold_id]},
        seed=0,
    )
    assert (first.added, first.skipped) == (10, 0)
    campaign.save_gold(ls.data_dir, pid, {gold_id: gt[gold_id]})
    again = campaign.import_images(
        client,
        url=url,
        token=token,
        project_id=pid,
        items=items,
        document_root=world,
        predictions=preds,
        model_version="gt-v1",
        overlap_fraction=0.2,
        seed=0,
    )
    assert (again.added, again.skipped) == (2, 10)  # idempotent: only the new images
    tids = {**first.task_ids, **again.task_ids}
    assert len(tids) == 12
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {token}"
    task0 = sess.get(f"{url}/api/tasks/{tids[gold_id]}").json()
    assert task0["overlap"] == 2  # gold goes to two raters
    assert task0["predictions"][0]["model_version"] == "gt-v1"
    img = sess.get(url + task0["data"]["image"])  # served from local files, not copied
    assert img.status_code == 200 and img.content == items[0].path.read_bytes()
    listed = [sess.get(f"{url}/api/tasks/{tids[it.id]}").json() for it in items]
    chosen = [bool(x["data"]["overlap"]) for x in listed]
    assert sum(chosen[:10]) in (2, 3) and not any(chosen[10:])  # 20% of 10 + gold
    assert [x["overlap"] for x in listed] == [2 if c else 1 for c in chosen]

    r1 = campaign.add_rater(url, token, "r1@gldboxes.test", "Rater-One-pw-1")
    r2 = campaign.add_rater(url, token, "r2@gldboxes.test", "Rater-Two-pw-2")
    assert r1.token not in repr(r1)
    # gold answers are not in what a rater can read (they live in our own file)
    as_rater = requests.get(
        f"{url}/api/tasks/{tids[gold_id]}", headers={"Authorization": f"Token {r1.token}"}
    )
    assert as_rater.status_code == 200 and as_rater.json()["data"]["gld_id"] == gold_id
    assert "gold" not in as_rater.text and gt[gold_id].to_string() not in as_rater.text
    c1, c2 = campaign.connect(url, r1.token), campaign.connect(url, r2.token)
    w, h = items[0].width, items[0].height
    t = [tids[it.id] for it in items]
    pe = [_edges(preds[it.id]) for it in items]
    shifted = (pe[0][0] + 0.02, pe[0][1], min(pe[0][2] + 0.02, 1.0), pe[0][3])
    far = (0.0, 0.0, 0.2, 0.2)
    # rater 1: kept, kept, two boxes, box+flag, empty, outside, tiny, flag, box (vs r2's flag)
    plan1 = [
        [ls_server.rect(pe[0], w, h)],
        [ls_server.rect(pe[1], w, h)],
        [ls_server.rect(pe[2], w, h), ls_server.rect(far, w, h)],
        [ls_server.rect(pe[3], w, h), ls_server.FLAG],
        [],
        [ls_server.rect((0.1, -0.1, 0.5, 0.4), w, h)],
        [ls_server.rect((0.5, 0.5, 0.505, 0.6), w, h)],
        [ls_server.FLAG],
        [ls_server.rect(far, w, h)],
    ]
    for k, res in enumerate(plan1):
        c1.annotations.create(id=t[k], result=res, lead_time=1.0 + k)
    before = sess.get(f"{url}/api/projects/{pid}").json()

    # restart mid-campaign: nothing is lost
    server.stop(ls.data_dir)
    assert server.health(url) is None
    server.start(ls, timeout=180)
    after = sess.get(f"{url}/api/projects/{pid}").json()
    for key in ("task_number", "total_annotations_number", "total_predictions_number"):
        assert after[key] == before[key], key
    assert after["total_annotations_number"] == 9

    # rater 2 (same token after the restart): moved box on gold, kept, flag (conflict), skip
    c2 = campaign.connect(url, r2.token)
    c2.annotations.create(id=t[0], result=[ls_server.rect(shifted, w, h)], lead_time=4.0)
    c2.annotations.create(id=t[1], result=[ls_server.rect(pe[1], w, h)], lead_time=2.0)
    c2.annotations.create(id=t[8], result=[ls_server.FLAG], lead_time=3.0)
    c2.annotations.create(id=t[9], result=[], was_cancelled=True)

    snap_path = export_snapshot(
        client, pid, tmp_path / "snap.json", gold=campaign.load_gold(ls.data_dir, pid)
    )
    snap = load_snapshot(snap_path)
    assert snap["users"][str(r1.id)] == r1.email
    assert all(
        isinstance(p, dict) and p["result"] for tk in snap["tasks"] for p in tk["predictions"]
    )  # full predictions
    tasks, anns = parse_snapshot(snap)
    assert len(tasks) == 12 and len(anns) == 13

    prog = progress(tasks, anns)
    assert prog["raters"][r1.email] == {
        "submitted": 9,
        "skipped": 0,
        "boxes": 7,
        "no_landmark": 2,
        "median_lead_time": 5.0,
    }
    assert prog["raters"][r2.email] == {
        "submitted": 3,
        "skipped": 1,
        "boxes": 2,
        "no_landmark": 1,
        "median_lead_time": 3.0,
    }
    need = {tk.task_id: 2 if tk.overlap else 1 for tk in tasks}
    raters_on = {
        tid: len({a.rater for a in anns if a.task_id == tid and not a.cancelled}) for tid in need
    }
    assert prog["tasks_done"] == sum(raters_on[k] >= n for k, n in need.items())
    assert prog["tasks_started"] == 9

    issues = validate(anns)
    rep = validation_report(tasks, anns, issues)
    assert rep["counts"] == {
        "box_and_flag": 1,
        "empty": 1,
        "outside_image": 1,
        "tiny_box": 1,
        "two_boxes": 1,
    }
    assert {(i.kind, i.task_id) for i in issues} == {
        ("two_boxes", t[2]),
        ("box_and_flag", t[3]),
        ("empty", t[4]),
        ("outside_image", t[5]),
        ("tiny_box", t[6]),
    }

    dec = decide(tasks, anns, issues)
    ids = [it.id for it in items]
    assert [dec[i].status for i in ids] == [
        "box",
        "box",
        "invalid",
        "invalid",
        "invalid",
        "box",
        "invalid",
        "no_landmark",
        "conflict",
        "skipped",
        "unannotated",
        "unannotated",
    ]
    boxes_csv, removed_csv = filter_boxes(dec, tmp_path / "boxes.csv", tmp_path / "removed.csv")
    boxes = read_boxes_csv(boxes_csv)
    assert sorted(boxes) == sorted([ids[0], ids[1], ids[5]])
    np.testing.assert_allclose(
        _edges(boxes[ids[0]][0]), (np.array(pe[0]) + np.array(shifted)) / 2, atol=1e-9
    )
    np.testing.assert_allclose(_edges(boxes[ids[1]][0]), pe[1], atol=1e-9)
    np.testing.assert_allclose(_edges(boxes[ids[5]][0]), (0.1, 0.0, 0.5, 0.4), atol=1e-9)
    with open(removed_csv, newline="") as fh:
        removed = {r["id"]: r["status"] for r in csv.DictReader(fh)}
    assert len(removed) == 9 and removed[ids[7]] == "no_landmark"

    from gldboxes.boxes import box_iou

    gold_iou = float(box_iou(np.array(shifted), np.array(pe[0])))
    agr = agreement(tasks, anns, issues)
    ov = agr["overlap"]
    assert (ov["pairs"], ov["both_box"], ov["box_vs_flag"]) == (3, 2, 1)
    assert ov["mean_iou"] == pytest.approx((gold_iou + 1.0) / 2, abs=1e-9)
    assert agr["gold"][r1.email] == {
        "answered": 1,
        "correct": 1,
        "accuracy": 1.0,
        "mean_iou": pytest.approx(1.0),
    }
    assert agr["gold"][r2.email]["mean_iou"] == pytest.approx(gold_iou, abs=1e-9)
    assert agr["preannotation"]["per_rater"] == {
        r1.email: {"kept": 2, "moved": 2, "deleted": 1},
        r2.email: {"kept": 1, "moved": 1, "deleted": 1},
    }

    # the command line gives the same files and figures
    out = tmp_path / "cli"
    assert cli_main(["annotate", "validate", "--snapshot", str(snap_path), "--out", str(out)]) == 0
    assert json.loads((out / "snap-validation.json").read_text())["counts"] == rep["counts"]
    assert cli_main(["annotate", "filter", "--snapshot", str(snap_path), "--out", str(out)]) == 0
    assert (out / "snap-boxes.csv").read_bytes() == boxes_csv.read_bytes()
    assert cli_main(["annotate", "agreement", "--snapshot", str(snap_path), "--out", str(out)]) == 0
    assert cli_main(["annotate", "server", "status", "--url", url]) == 0


def _ensure_chromium() -> None:
    if CHROMIUM.exists():
        return
    if shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "chromium"], check=False, capture_output=True, timeout=600
        )
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian package 'chromium' is required for the labeling-page test and could "
            "not be installed (apt-get install -y chromium)"
        )


def test_browser_submits_preannotation(ls: server.ServerSettings, world: Path) -> None:
    _ensure_chromium()
    from playwright.sync_api import sync_playwright

    url, token = ls.url, ls.token
    client = campaign.connect(url, token)
    train = world / "train"
    items = campaign.read_split(train / "train.csv")[:2]
    pred = Box(0.15, 0.2, 0.7, 0.8, 0.87)
    pid = campaign.create_campaign(client, title="browser check", image_dir=train / "images")
    res = campaign.import_images(
        client,
        url=url,
        token=token,
        project_id=pid,
        items=items,
        document_root=world,
        predictions={items[0].id: pred},
        model_version="det-v1",
    )
    tid = res.task_ids[items[0].id]
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {token}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/user/login/")
            page.fill("input[name=email]", ls_server.ADMIN_EMAIL)
            page.fill("input[name=password]", ls_server.ADMIN_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{url}/projects/{pid}/data?task={tid}")
            page.get_by_text("landmark", exact=True).first.wait_for(timeout=60_000)
            page.wait_for_function(
                "() => [...document.images].some("
                "i => i.src.includes('local-files') && i.naturalWidth > 0)",
                timeout=60_000,
            )
            page.get_by_role("button", name="Submit").click()
            deadline = time.monotonic() + 30
            anns: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not anns:
                anns = sess.get(f"{url}/api/tasks/{tid}").json()["annotations"]
                time.sleep(0.3)
        finally:
            browser.close()
    assert len(anns) == 1
    result = anns[0]["result"]
    assert [r["type"] for r in result] == ["rectanglelabels"]
    assert result[0]["value"]["rectanglelabels"] == ["landmark"]
    v = result[0]["value"]
    np.testing.assert_allclose(
        [v["y"], v["x"], v["y"] + v["height"], v["x"] + v["width"]],
        [15.0, 20.0, 70.0, 80.0],
        atol=1e-6,
    )


def test_data_dir_private_and_logs_redacted(ls: server.ServerSettings) -> None:
    """The data dir (its database holds every API token) and logs are owner-only, and no
    invite token or API token reaches a log, though the signup requests are logged."""
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {ls.token}"
    invite = sess.get(f"{ls.url}/api/invite", timeout=60).json()["token"]
    rater = campaign.add_rater(ls.url, ls.token, "r3@gldboxes.test", "Rater-Three-pw-3")
    requests.get(f"{ls.url}/user/signup/?next=/projects/&token={invite}&x=1", timeout=60)
    log = ls.data_dir / "server.log"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "&x=1" not in log.read_text(errors="replace"):
        time.sleep(0.2)
    assert stat.S_IMODE(ls.data_dir.stat().st_mode) == 0o700
    for name in ("label_studio.sqlite3", "server.log"):
        assert stat.S_IMODE((ls.data_dir / name).stat().st_mode) == 0o600, name
    logs = {p.name: p.read_text(errors="replace") for p in ls.data_dir.rglob("*.log")}
    assert "/user/signup/" in logs["server.log"] and "&x=1" in logs["server.log"]
    for name, text in logs.items():
        for secret in (invite, rater.token, ls.token):
            assert secret not in text, name
        assert not re.search(r"token=(?!\[REDACTED\])", text), name


class TestRedact:
    def test_real_case(self) -> None:
        from annotation.logpipe import redact

        line = '[INFO] "GET /user/signup/?next=/projects/&token=QBRW4sCd&x=1 HTTP/1.1" 200 29038'
        assert redact(line) == line.replace("QBRW4sCd", "[REDACTED]")
        nested = "GET /user/login/?next=/user/signup/%3Ftoken%3DAbC%2Bd%26x%3D1 HTTP/1.1"
        assert redact(nested) == nested.replace("AbC%2Bd", "[REDACTED]")
        assert redact("Authorization: Token 0123456789abcdef") == "Authorization: Token [REDACTED]"
        for kept in ("GET /api/current-user/token HTTP/1.1", "Tokenizer ready", "?page=2&x=1"):
            assert redact(kept) == kept


def test_create_outside_document_root_leaves_no_project(
    ls: server.ServerSettings, tmp_path: Path
) -> None:
    """Label Studio refuses storage outside its document root: a one-line error saying what to
    do, and no empty project left behind (it used to leave one on every try)."""
    client = campaign.connect(ls.url, ls.token)
    before = {p.id for p in client.projects.list()}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(ValueError, match="--document-root") as err:
        campaign.create_campaign(client, title="outside root", image_dir=outside)
    assert "\n" not in str(err.value)
    assert {p.id for p in client.projects.list()} == before


def test_cli_create_checks_the_document_root_first(tmp_path: Path) -> None:
    """`annotate create` against a server started without --document-root stops before
    creating anything, with one line naming the fix (exit 2, no traceback)."""
    import sys

    data = tmp_path / "ls"
    data.mkdir()
    (data / server.STATE_FILE).write_text(
        json.dumps(
            {"format_version": 1, "pid": 1, "url": "http://127.0.0.1:9", "document_root": None}
        )
    )
    (data / server.TOKEN_FILE).write_text("x")
    images = tmp_path / "images"
    images.mkdir()
    args = ["annotate", "create", "--data-dir", str(data), "--title", "t1 t2"]
    proc = subprocess.run(
        [sys.executable, "-m", "gldboxes", *args, "--image-dir", str(images)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "--document-root" in err and str(data) in err
