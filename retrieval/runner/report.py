"""A self-contained HTML page of query results: thumbnails, regions and verified matches.

``report/index.html`` holds everything inline (JPEG thumbnails as base64 ``data:`` URIs, SVG
overlays), so it opens without the index or the photos. Per query: the query photo, then one
card per result (``div.result-card``, best first) with the result's thumbnail, its index-side
regions drawn as boxes (region 0, the whole photo, is not drawn), and, when the results were
spatially verified, the query thumbnail beside it with a line per inlier correspondence.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gldboxes.io import atomic_write

__all__ = ["MAX_LINES", "thumbnail", "write_report"]

logger = logging.getLogger("retrieval.runner.report")

#: Inlier lines drawn per result at most (the strongest page stays light).
MAX_LINES = 150
_GAP = 12  # pixels between the query and the result thumbnails of a card

_CSS = """
body { font-family: sans-serif; margin: 16px; background: #fafafa; color: #222; }
section.query { margin-bottom: 32px; }
.query-img { border: 3px solid #1565c0; display: block; margin: 8px 0 16px 0; }
.results { display: flex; flex-wrap: wrap; gap: 14px; }
.result-card { background: #fff; border: 1px solid #ccc; padding: 6px; }
.pair { position: relative; }
.pair img, .pair svg { position: absolute; top: 0; }
.caption { font-size: 12px; margin-top: 4px; max-width: 520px; overflow-wrap: anywhere; }
"""


def thumbnail(path: str | os.PathLike[str], max_side: int) -> tuple[str, int, int, int, int]:
    """A JPEG thumbnail of a photo (EXIF orientation applied, as the features see it).

    Returns:
        ``(data URI, thumbnail width, height, original width, height)``.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as src:
        im = ImageOps.exif_transpose(src).convert("RGB")
    w, h = im.size
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    tw, th = im.size
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return uri, tw, th, w, h


def _card(res: Any, r: int, q_thumb: tuple[str, int, int, int, int] | None, thumb_side: int) -> str:
    """One result card: thumbnails, SVG overlay of regions and inlier lines, caption."""
    uri, tw, th, w, h = thumbnail(res.paths[r], thumb_side)
    qw = qh = 0
    parts = []
    shapes = []
    ox = 0
    if q_thumb is not None:
        quri, qw, qh, qW, qH = q_thumb
        ox = qw + _GAP
        parts.append(
            f'<img class="q-thumb" src="{quri}" style="left:0" width="{qw}" height="{qh}">'
        )
        m = res.matches[r][:MAX_LINES]
        for xq, yq, xd, yd in m.tolist():
            shapes.append(
                f'<line x1="{xq * qw / qW:.1f}" y1="{yq * qh / qH:.1f}" '
                f'x2="{ox + xd * tw / w:.1f}" y2="{yd * th / h:.1f}" '
                'stroke="#00e676" stroke-width="1" stroke-opacity="0.8"/>'
            )
    parts.insert(
        0, f'<img class="r-thumb" src="{uri}" style="left:{ox}px" width="{tw}" height="{th}">'
    )
    for b in list(res.regions[r])[1:]:
        shapes.append(
            f'<rect class="region" x="{ox + b.xmin * tw:.1f}" y="{b.ymin * th:.1f}" '
            f'width="{(b.xmax - b.xmin) * tw:.1f}" height="{(b.ymax - b.ymin) * th:.1f}" '
            'fill="none" stroke="#ff1744" stroke-width="2"/>'
        )
    width, height = ox + tw, max(th, qh)
    svg = (
        f'<svg class="overlay" width="{width}" height="{height}" style="left:0">'
        + "".join(shapes)
        + "</svg>"
    )
    inl = "" if res.inliers is None else f" &middot; {int(res.inliers[r])} inliers"
    return (
        f'<div class="result-card" data-rank="{r + 1}" data-id="{int(res.ids[r])}" '
        f'data-score="{float(res.scores[r]):.6f}"'
        + ("" if res.inliers is None else f' data-inliers="{int(res.inliers[r])}"')
        + f'><div class="pair" style="width:{width}px;height:{height}px">'
        + "".join(parts)
        + svg
        + f'</div><div class="caption">#{r + 1} score {float(res.scores[r]):.4f}{inl}<br>'
        + f"{html.escape(os.fspath(res.paths[r]))}</div></div>"
    )


def write_report(
    results: Sequence[Any],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "gldboxes retrieval",
    thumb_side: int = 240,
    query_side: int = 360,
) -> Path:
    """Write ``out_dir/index.html`` for query results
    (:class:`retrieval.runner.photos.QueryResult`).

    Args:
        results: one result per query photo.
        out_dir: the report folder (created).
        thumb_side: longest side of a result thumbnail in pixels (the query beside it in a
            verified card too).
        query_side: longest side of the query photo at the top of its section.

    Returns:
        the HTML file.
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    for res in results:
        quri, qw, qh, _, _ = thumbnail(res.query, query_side)
        small = None if res.matches is None else thumbnail(res.query, thumb_side)
        cards = "".join(_card(res, r, small, thumb_side) for r in range(len(res.ids)))
        body.append(
            f'<section class="query" data-query="{html.escape(os.fspath(res.query))}">'
            f"<h2>query: {html.escape(Path(res.query).name)}</h2>"
            f'<img class="query-img" src="{quri}" width="{qw}" height="{qh}">'
            f'<div class="results">{cards}</div></section>'
        )
    page = (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )
    out = Path(out_dir) / "index.html"
    with atomic_write(out) as fh:
        fh.write(page)
    out.chmod(0o644)  # a page to share (the atomic temporary file is private)
    logger.info("report: %s (%d queries)", out, len(results))
    return out
