"""Import throughput of a Label Studio campaign: 10,000 tasks with inline pre-annotations.

Starts a throw-away Label Studio (from the cached migrated template) and measures, in the same
run: (a) ``annotation.campaign.import_images`` of N tasks with one inline prediction each,
(b) the same N tasks without predictions, (c) **the peer**: Label Studio's own bulk import of the
same N task payloads with inline predictions in one ``projects.import_tasks`` call (no
existence check, no idempotency: what a script using the SDK at its best does), (d) the naive
way, one ``predictions.create`` call per task, timed on a sample (shown, but not a peer); and
(e) the cost of giving a task to two raters (one ``PATCH /api/tasks/<id>`` each). Prints
tasks/s and the ratios. Label Studio runs its default worker setup; the client is one thread.

Then (e) an import of ``--overlap-tasks`` tasks with 10% overlap (``import_images``, the PATCHes
sent 8 at a time), and the same PATCHes on those tasks again one at a time (``workers=1``, the
old way) and 8 at a time, timed in the same run.

    .venv/bin/python benchmarks/annotation_import.py [--tasks 10000] [--sample 100]
        [--overlap-tasks 1000]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import requests

from annotation import campaign, server
from gldboxes.boxes import Box

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "labelstudio-template"
EMAIL, PASSWORD, TOKEN = "bench@gldboxes.test", "bench-pw-123456", "gldboxes-bench-token-01234"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=100, help="tasks for the one-by-one peer")
    ap.add_argument("--overlap-tasks", type=int, default=1000, help="tasks of the overlap run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ls-bench-"))
    try:
        root = tmp / "images"
        root.mkdir()
        image = root / "img.jpg"
        cv2.imwrite(str(image), np.full((240, 320, 3), 127, np.uint8))
        template = server.template_data_dir(CACHE, username=EMAIL, password=PASSWORD, token=TOKEN)
        server.copy_data_dir(template, tmp / "data")
        conf = server.ServerSettings(
            data_dir=tmp / "data",
            port=server.free_port(),
            username=EMAIL,
            password=PASSWORD,
            token=TOKEN,
            document_root=tmp,
        )
        server.start(conf, timeout=300)
        try:
            client = campaign.connect(conf.url, TOKEN)
            rng = np.random.default_rng(0)
            lo = rng.uniform(0, 0.5, (args.tasks, 2))
            hi = lo + rng.uniform(0.05, 0.5, (args.tasks, 2))
            items = [
                campaign.ImageItem(f"{k:016x}", image, str(k % 100), 320, 240)
                for k in range(args.tasks)
            ]
            preds = {
                it.id: Box(lo[k, 0], lo[k, 1], hi[k, 0], hi[k, 1], 0.5)
                for k, it in enumerate(items)
            }
            rates = {}
            for name, p in (("with predictions", preds), ("without predictions", None)):
                pid = campaign.create_campaign(client, title=f"bench {name}", image_dir=root)
                t0 = time.perf_counter()
                res = campaign.import_images(
                    client,
                    url=conf.url,
                    token=TOKEN,
                    project_id=pid,
                    items=items,
                    document_root=tmp,
                    predictions=p,
                    model_version="bench" if p else "",
                    overlap_fraction=0.0,
                )
                dt = time.perf_counter() - t0
                assert res.added == args.tasks
                rates[name] = args.tasks / dt
                print(f"import {args.tasks} tasks {name}: {dt:.1f} s = {rates[name]:.0f} tasks/s")
            # the peer: the same payloads, predictions inline, in one bulk call of the SDK
            ppid = campaign.create_campaign(client, title="bench bulk peer", image_dir=root)
            payload = [
                {
                    "data": {
                        campaign.IMAGE_NAME: campaign.local_files_url(it.path, Path(tmp)),
                        "gld_id": it.id,
                        "landmark_id": it.landmark_id,
                        "width": it.width,
                        "height": it.height,
                        "overlap": False,
                    },
                    "predictions": [campaign.prediction_for(preds[it.id], 320, 240, "bench")],
                }
                for it in items
            ]
            t0 = time.perf_counter()
            client.projects.import_tasks(id=ppid, request=payload, return_task_ids=True)
            bulk = args.tasks / (time.perf_counter() - t0)
            print(f"peer, Label Studio bulk import_tasks with predictions: {bulk:.0f} tasks/s")
            # not a peer: predictions posted one by one on the tasks imported without predictions
            tids = list(campaign.existing_task_ids(conf.url, TOKEN, pid).values())[: args.sample]
            box = preds[items[0].id]
            t0 = time.perf_counter()
            for tid in tids:
                pr = campaign.prediction_for(box, 320, 240, "bench")
                client.predictions.create(
                    task=tid, result=pr["result"], score=pr["score"], model_version="bench"
                )
            one = len(tids) / (time.perf_counter() - t0)
            print(f"predictions.create one by one ({len(tids)} tasks): {one:.1f} tasks/s")
            t0 = time.perf_counter()
            campaign.set_task_overlap(conf.url, TOKEN, tids[:20], 2)
            print(f"overlap PATCH per task (20 tasks): {(time.perf_counter() - t0) / 20:.2f} s")
            print(
                f"ours / the bulk peer: {rates['with predictions'] / bulk:.2f}x "
                f"(ours also checks what is already imported, twice); "
                f"ours / one call per task (not a peer): {rates['with predictions'] / one:.1f}x"
            )
            print(
                f"ratio with / without predictions: "
                f"{rates['with predictions'] / rates['without predictions']:.2f}"
            )
            n = args.overlap_tasks
            pid = campaign.create_campaign(client, title="bench overlap", image_dir=root)
            t0 = time.perf_counter()
            campaign.import_images(
                client,
                url=conf.url,
                token=TOKEN,
                project_id=pid,
                items=items[:n],
                document_root=tmp,
                overlap_fraction=0.1,
            )
            total = time.perf_counter() - t0
            sess = requests.Session()
            sess.headers["Authorization"] = f"Token {TOKEN}"
            double = [
                tid
                for tid in campaign.existing_task_ids(conf.url, TOKEN, pid).values()
                if sess.get(f"{conf.url}/api/tasks/{tid}").json()["overlap"] == 2
            ]
            assert len(double) == round(0.1 * n), len(double)
            times = {}
            for workers in (1, 8):
                t0 = time.perf_counter()
                campaign.set_task_overlap(conf.url, TOKEN, double, 2, workers=workers)
                times[workers] = time.perf_counter() - t0
            print(
                f"import {n} tasks with 10% overlap: {total:.1f} s "
                f"(before: ~{total - times[8] + times[1]:.1f} s with one PATCH at a time)"
            )
            print(
                f"overlap of {len(double)} tasks: one at a time {times[1]:.1f} s, 8 at a time "
                f"{times[8]:.1f} s, ratio {times[1] / times[8]:.2f}x"
            )
        finally:
            server.stop(conf.data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
