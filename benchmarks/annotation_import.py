"""Import throughput of a Label Studio campaign: 10,000 tasks with inline pre-annotations.

Starts a throw-away Label Studio (from the cached migrated template) and measures, in the same
run: (a) ``annotation.campaign.import_images`` of N tasks with one inline prediction each,
(b) the same N tasks without predictions, (c) the naive peer: one ``predictions.create`` call
per task, timed on a sample and reported per task; and (d) the cost of giving a task to two
raters (one ``PATCH /api/tasks/<id>`` each). Prints tasks/s and the ratios.

    .venv/bin/python benchmarks/annotation_import.py [--tasks 10000] [--sample 100]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from annotation import campaign, server
from gldboxes.boxes import Box

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "labelstudio-template"
EMAIL, PASSWORD, TOKEN = "bench@gldboxes.test", "bench-pw-123456", "gldboxes-bench-token-01234"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=100, help="tasks for the one-by-one peer")
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
            # peer: predictions posted one by one on the tasks imported without predictions
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
                f"ratio inline-predictions import / one-by-one: "
                f"{rates['with predictions'] / one:.1f}x"
            )
            print(
                f"ratio with / without predictions: "
                f"{rates['with predictions'] / rates['without predictions']:.2f}"
            )
        finally:
            server.stop(conf.data_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
