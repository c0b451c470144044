"""What a campaign lead does, through the ``gldboxes annotate`` command line and a real server.

The README's annotation block runs as written (from a temporary working directory holding a
``.venv`` link to the repository's); the lead commands (server start/info/stop, create,
raters) and the refusals are driven through the CLI against a real Label Studio started from
the cached template (``tests/ls_server.py``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import ls_server
import numpy as np
import pytest
import requests

from annotation import campaign, server
from gldboxes.boxes import read_boxes_csv

REPO = Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> list[str]:
    """The command lines of the first ``bash`` block under ``heading`` in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, f"README.md: no bash block under {heading!r}"
    lines: list[str] = []
    for raw in block.group(1).splitlines():
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + raw.strip()
        elif raw.strip():
            lines.append(raw.strip())
    return lines


def _gldboxes(cwd: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """``gldboxes ARGS`` from ``cwd`` (a fresh process, as a user runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "gldboxes", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1", **(env or {})},
    )


def _ok(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _one_line_error(proc: Any) -> str:
    """Exit 2 with one line on stderr (no traceback); the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return err[0]


def _seed_data_dir(data_dir: Path) -> int:
    """Copy the migrated template into ``data_dir`` (skips 1-2 min of migrations) and give it a
    free port; returns the port."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server.copy_data_dir(ls_server.template(), data_dir)
    port = server.free_port()
    (data_dir / server.SETTINGS_FILE).write_text(
        json.dumps({"format_version": 1, "document_root": None, "port": port})
    )
    return port


class TestReadSplit:
    """``gldboxes split`` output (``id,landmark_id``) is read by finding the images by id."""

    def test_real_case(self, tmp_path: Path) -> None:
        img = tmp_path / "world" / "images" / "a" / "b" / "c" / "abc123.jpg"
        img.parent.mkdir(parents=True)
        flat = tmp_path / "world" / "xyz789.jpg"
        from PIL import Image

        Image.new("RGB", (40, 30)).save(img)
        Image.new("RGB", (20, 10)).save(flat)
        split = tmp_path / "train.csv"
        split.write_text("id,landmark_id\nabc123,7\nxyz789,8\n")
        items = campaign.read_split(split, tmp_path / "world")
        assert [(i.id, i.path, i.landmark_id, i.width, i.height) for i in items] == [
            ("abc123", img.resolve(), "7", 40, 30),
            ("xyz789", flat.resolve(), "8", 20, 10),
        ]

    def test_exception(self, tmp_path: Path) -> None:
        split = tmp_path / "train.csv"
        split.write_text("id,landmark_id\nmissing1,7\n")
        with pytest.raises(ValueError, match=r"train.csv:2: image .*missing1.jpg does not exist"):
            campaign.read_split(split, tmp_path)
        split.write_text("id,box\nx,0 0 1 1\n")
        with pytest.raises(ValueError, match="expected columns"):
            campaign.read_split(split, tmp_path)


@pytest.mark.server
@pytest.mark.slow
def test_readme_annotation_recipe(tmp_path: Path) -> None:
    """The README's annotation block, every line as written, from a fresh working directory;
    between import and progress, the rater added by the block boxes three images."""
    lines = _readme_block("### Annotation campaigns (Label Studio)")
    assert lines[0].startswith(".venv/bin/gldboxes synth")
    assert lines[-1] == ".venv/bin/gldboxes annotate server stop"
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(REPO / ".venv")
    port = _seed_data_dir(work / "runs" / "ls")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop(server.TOKEN_ENV, None)
    env.pop(server.DATA_DIR_ENV, None)
    outputs: dict[str, str] = {}  # "annotate server info" -> its stdout
    annotated: dict[str, Any] = {}
    try:
        for line in lines:
            args = shlex.split(line, comments=True)
            step = " ".join(args[1:4] if args[2] in ("server", "raters") else args[1:3])
            proc = subprocess.run(
                line, shell=True, cwd=work, env=env, capture_output=True, text=True, timeout=900
            )
            assert proc.returncode == 0, (line, proc.stderr[-3000:])
            outputs[step] = proc.stdout
            if step == "annotate import":
                annotated = _rater_boxes_three(work, port)
    finally:
        server.stop(work / "runs" / "ls")

    info = json.loads(outputs["annotate server info"])
    assert info["url"] == f"http://127.0.0.1:{port}" and info["running"] is True
    assert (info["email"], info["password"]) == (ls_server.ADMIN_EMAIL, ls_server.ADMIN_PASSWORD)
    assert info["document_root"] == str((work / "runs" / "world").resolve())
    assert outputs["annotate create"].strip() == "1"
    added = json.loads(outputs["annotate raters add"])
    assert added["password_file"] == "runs/ls/raters/rater1@example.com.password"
    imported = json.loads(outputs["annotate import"])
    assert (imported["added"], imported["skipped"]) == (24, 0)
    prog = json.loads(outputs["annotate progress"])
    assert prog["raters"]["rater1@example.com"]["submitted"] == 4
    agr = json.loads(outputs["annotate agreement"])
    assert agr["gold"]["rater1@example.com"] == {
        "answered": 3,
        "correct": 3,
        "accuracy": 1.0,
        "mean_iou": pytest.approx(1.0, abs=1e-6),
    }
    export = work / "runs" / "export"
    boxes = read_boxes_csv(export / "project-1-snapshot-boxes.csv")
    assert sorted(boxes) == sorted(annotated["boxed"])
    for key, (b,) in boxes.items():
        np.testing.assert_allclose(
            (b.ymin, b.xmin, b.ymax, b.xmax), annotated["boxed"][key], atol=1e-6
        )
    with open(export / "project-1-snapshot-removed.csv", newline="") as fh:
        removed = {r["id"]: r["status"] for r in csv.DictReader(fh)}
    assert removed[annotated["flagged"]] == "no_landmark"
    assert sum(v == "unannotated" for v in removed.values()) == 24 - 4
    raters = json.loads(outputs["annotate raters list"])
    by_email = {r["email"]: r for r in raters}
    assert by_email["rater1@example.com"]["submitted"] == 4
    assert by_email[ls_server.ADMIN_EMAIL]["admin"] is True
    assert json.loads(outputs["annotate server stop"])["stopped"] is True
    snap = json.loads((export / "project-1-snapshot.json").read_text())
    assert all("gold" not in t["data"] for t in snap["tasks"])
    assert len(snap["gold"]) == 47  # every known box of the world, from runs/ls/gold


def _rater_boxes_three(work: Path, port: int) -> dict[str, Any]:
    """Log in as the README's rater (password from the file it names) and annotate: three gold
    images boxed exactly, and the no-landmark image of the split flagged."""
    data_dir = work / "runs" / "ls"
    url = f"http://127.0.0.1:{port}"
    pw_file = data_dir / "raters" / "rater1@example.com.password"
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    login = json.loads((data_dir / server.LOGIN_FILE).read_text())
    assert stat.S_IMODE((data_dir / server.LOGIN_FILE).stat().st_mode) == 0o600
    admin = server.resolve_token(data_dir)
    rater = campaign.add_rater(url, admin, "rater1@example.com", pw_file.read_text().strip())
    assert login["email"] == ls_server.ADMIN_EMAIL
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {rater.token}"
    tasks = sess.get(f"{url}/api/tasks", params={"project": "1", "page_size": "100"}).json()
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    assert len(tasks) == 24
    gt = {k: v[0] for k, v in read_boxes_csv(work / "runs/world/train/boxes.csv").items()}
    boxed: dict[str, tuple[float, float, float, float]] = {}
    flagged = ""
    for t in sorted(tasks, key=lambda t: int(t["id"])):
        full = sess.get(f"{url}/api/tasks/{t['id']}")
        assert "gold" not in full.json()["data"]  # what the rater reads holds no answer
        d = full.json()["data"]
        gid, w, h = d["gld_id"], d["width"], d["height"]
        if gid in gt and len(boxed) < 3:
            e = (gt[gid].ymin, gt[gid].xmin, gt[gid].ymax, gt[gid].xmax)
            res = [ls_server.rect(e, w, h)]
            boxed[gid] = e
        elif gid not in gt and not flagged:
            res, flagged = [ls_server.FLAG], gid
        else:
            continue
        r = sess.post(
            f"{url}/api/tasks/{t['id']}/annotations/", json={"result": res, "lead_time": 2.0}
        )
        assert r.status_code == 201, r.text[:300]
    assert len(boxed) == 3 and flagged
    return {"boxed": boxed, "flagged": flagged}


@pytest.mark.server
@pytest.mark.slow
def test_lead_commands_and_refusals(tmp_path: Path) -> None:
    """server start/info/stop, create (checked first, rerun-safe), import, raters add/list/
    remove, a restart that reuses the document root and keeps the token, refused starts, and a
    data dir without login file."""
    from gldboxes.synth import confs, generate_world

    world = generate_world(tmp_path / "world", confs["tiny"])
    images = world / "train" / "images"
    data = tmp_path / "ls"
    port = _seed_data_dir(data)
    url = f"http://127.0.0.1:{port}"
    env = {server.DATA_DIR_ENV: str(data)}  # later commands find the data dir through it

    def run(*args: str) -> Any:
        return _gldboxes(tmp_path, "annotate", *args, env=env)

    def out(*args: str) -> Any:
        return json.loads(_ok(run(*args)).stdout)

    try:
        started = out("server", "start", "--document-root", str(world))
        assert started["url"] == url and started["document_root"] == str(world.resolve())
        info = out("server", "info")
        assert (info["email"], info["password"]) == (
            ls_server.ADMIN_EMAIL,
            ls_server.ADMIN_PASSWORD,
        )
        assert info["running"] is True and info["projects"] == 0
        assert stat.S_IMODE(Path(info["login_file"]).stat().st_mode) == 0o600

        # create: checked before anything is created, and rerun-safe
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        err = _one_line_error(run("create", "--title", "Boxes", "--image-dir", str(outside)))
        assert "not under the server's document root" in err
        first = _ok(run("create", "--title", "Boxes", "--image-dir", str(images))).stdout.strip()
        again = _ok(run("create", "--title", "Boxes", "--image-dir", str(images))).stdout.strip()
        assert first == again
        assert out("server", "info")["projects"] == 1
        imported = out("import", "--project", first, "--split", str(world / "train/train.csv"))
        assert (imported["added"], imported["skipped"]) == (48, 0)

        # raters: add (password from a file), annotate, list with counts, remove
        pw = tmp_path / "pw.txt"
        pw.write_text("Rater-Two-pw-2\n")
        added = out("raters", "add", "r2@gldboxes.test", "--password-file", str(pw))
        rater = campaign.add_rater(url, ls_server.ADMIN_TOKEN, "r2@gldboxes.test", "Rater-Two-pw-2")
        assert rater.id == added["id"]  # the file's password logs in
        as_rater = {"Authorization": f"Token {rater.token}"}
        tasks = requests.get(
            f"{url}/api/tasks", params={"project": first, "page_size": "2"}, headers=as_rater
        ).json()
        tid = int((tasks["tasks"] if isinstance(tasks, dict) else tasks)[0]["id"])
        r = requests.post(
            f"{url}/api/tasks/{tid}/annotations/",
            json={"result": [ls_server.FLAG]},
            headers=as_rater,
        )
        assert r.status_code == 201, r.text[:300]
        listed = out("raters", "list")
        assert [(r["email"], r["admin"], r["submitted"], r["skipped"]) for r in listed] == [
            (ls_server.ADMIN_EMAIL, True, 0, 0),
            ("r2@gldboxes.test", False, 1, 0),
        ]
        assert out("raters", "remove", "r2@gldboxes.test") == {
            "removed": "r2@gldboxes.test",
            "id": rater.id,
        }
        assert requests.get(f"{url}/api/projects/{first}", headers=as_rater).status_code in (
            401,
            403,
            404,
        )
        assert [r["email"] for r in out("raters", "list")] == [ls_server.ADMIN_EMAIL]
        assert "is the admin" in _one_line_error(run("raters", "remove", ls_server.ADMIN_EMAIL))
        out("export", "--project", first, "--out", str(tmp_path / "export"))
        snap = json.loads((tmp_path / "export" / f"project-{first}-snapshot.json").read_text())
        assert snap["users"][str(rater.id)] == "r2@gldboxes.test"  # still theirs after removal

        # restart without --document-root, with a stale token file: the remembered root and
        # the database's token are used, so images are served and commands get no 401
        out("server", "stop")
        (data / server.TOKEN_FILE).write_text("stale-token-from-an-earlier-start")
        restarted = out("server", "start")
        assert restarted["document_root"] == str(world.resolve())
        assert (data / server.TOKEN_FILE).read_text() == ls_server.ADMIN_TOKEN
        assert out("server", "info")["projects"] == 1
        sess = requests.Session()
        sess.headers["Authorization"] = f"Token {ls_server.ADMIN_TOKEN}"
        task = sess.get(f"{url}/api/tasks/{tid}").json()
        img = sess.get(url + task["data"]["image"])
        assert img.status_code == 200 and img.content[:2] == b"\xff\xd8"

        # refused starts: a running server; a root that does not hold the project's images;
        # no root at all once a project serves local files
        assert "already runs" in _one_line_error(run("server", "start"))
        out("server", "stop")
        err = _one_line_error(run("server", "start", "--document-root", str(outside)))
        assert f"does not hold {images.resolve()}" in err and "refusing to start" in err
        (data / server.SETTINGS_FILE).unlink()
        assert "needs --document-root" in _one_line_error(run("server", "start"))
        assert server.read_state(data) is None and server.health(url) is None

        # a data dir without login file (older versions): the password is reset and written
        # once; the admin logs in with it
        (data / server.LOGIN_FILE).unlink()
        (data / server.SETTINGS_FILE).write_text(json.dumps({"document_root": None, "port": port}))
        out("server", "start", "--document-root", str(world))
        email, password = server.read_login(data) or ("", "")
        assert email == ls_server.ADMIN_EMAIL and password != ls_server.ADMIN_PASSWORD
        me = campaign.add_rater(url, ls_server.ADMIN_TOKEN, email, password)
        assert me.token == ls_server.ADMIN_TOKEN
    finally:
        server.stop(data)
