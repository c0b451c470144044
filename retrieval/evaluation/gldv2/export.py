"""A Revisited-style folder laid out as a GLDv2 download, to try the GLDv2 tools on any dataset."""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from gldboxes.gld import image_relpath
from gldboxes.io import atomic_dir, read_json, write_json
from retrieval.evaluation.gldv2.benchmark import FORMAT_VERSION
from retrieval.evaluation.gldv2.files import write_csv_rows

__all__ = ["export_revisited"]

logger = logging.getLogger("retrieval.evaluation.gldv2")


def export_revisited(
    dataset: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    protocol: str = "medium",
    overwrite: bool = False,
) -> Path:
    """Lay out a Revisited-style folder (roxford5k, rparis6k, the synthetic world) as a GLDv2
    download with a retrieval solution, to try the GLDv2 tools on any benchmark::

        OUT/index/index.csv, OUT/index/images/a/b/c/<id>.jpg     database images (copies)
        OUT/test/test.csv, OUT/test/images/a/b/c/<id>.jpg        queries, cropped to their box
        OUT/test/retrieval_solution_v2.1.csv                     id,images,Usage

    Ids are the image names (a query also in the database gets ``_query`` appended). The
    positives of a query are those of the Revisited ``protocol`` (medium: easy + hard); its
    junk becomes negative (GLDv2 has no junk). Queries alternate Public, Private in file order;
    a query without positives is Ignored (``None``). Written atomically; skipped when done.
    """
    from PIL import Image, ImageOps

    from retrieval.evaluation.datasets import RevisitedDataset
    from retrieval.evaluation.evaluate import protocol_gnd

    ds = RevisitedDataset.load(Path(dataset))
    out = Path(out)
    key = {"dataset": str(ds.root.resolve()), "name": ds.name, "protocol": protocol}
    done = out / "export.json"
    if done.is_file() and read_json(done).get("key") == key and not overwrite:
        logger.info("GLDv2 export exists, skipping: %s", out)
        return out
    if out.exists() and not done.is_file() and any(out.iterdir()):
        raise ValueError(f"{out}: exists and is not a GLDv2 export; choose another folder")
    gnd = protocol_gnd(ds.gnd, protocol)  # type: ignore[arg-type]  # checked there
    missing = ds.missing_images()
    if missing:
        raise ValueError(f"{ds.root}: {len(missing)} images missing (first: {missing[:3]})")
    db = set(ds.imlist)
    q_ids = [f"{n}_query" if n in db else n for n in ds.qimlist]
    rows: list[list[str]] = []
    for j, (qid, g) in enumerate(zip(q_ids, gnd, strict=True)):
        pos = sorted(ds.imlist[i] for i in np.unique(g["ok"]))
        usage = "Public" if j % 2 == 0 else "Private"
        rows.append([qid, " ".join(pos), usage] if pos else [qid, "None", "Ignored"])
    with atomic_dir(out) as tmp:
        for name in ds.imlist:
            dst = tmp / "index" / "images" / image_relpath(name)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ds.image_path(name), dst)
        for i, (name, qid) in enumerate(zip(ds.qimlist, q_ids, strict=True)):
            dst = tmp / "test" / "images" / image_relpath(qid)
            dst.parent.mkdir(parents=True, exist_ok=True)
            box = ds.query_bbx(i)
            if box is None:
                shutil.copyfile(ds.image_path(name), dst)
                continue
            x1, y1, x2, y2 = box  # the features stage's crop: floor / ceil, clipped
            with Image.open(ds.image_path(name)) as raw:
                im = ImageOps.exif_transpose(raw)  # boxes are in upright pixels
                w, h = im.size
                crop = (
                    max(0, math.floor(x1)),
                    max(0, math.floor(y1)),
                    min(w, math.ceil(x2)),
                    min(h, math.ceil(y2)),
                )
                im.convert("RGB").crop(crop).save(dst, quality=95)
        for split, ids in (("index", ds.imlist), ("test", q_ids)):
            write_csv_rows(tmp / split / f"{split}.csv", ["id"], [[i] for i in ids])
        write_csv_rows(
            tmp / "test" / "retrieval_solution_v2.1.csv", ["id", "images", "Usage"], rows
        )
        write_json(
            tmp / "export.json",
            {"format_version": FORMAT_VERSION, "key": key, "n_index": ds.n_db},
        )
    logger.info("%s as GLDv2 in %s: %d index images, %d queries", ds.name, out, ds.n_db, len(q_ids))
    return out
