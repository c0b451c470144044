"""Download throughput of ``download_url_list`` against a plain sequential ``requests`` loop.

A local server (``tests/fault_server.py``, run in its own process so it does not share our GIL)
serves N small JPEGs; an optional per-request delay stands in for network latency. Both
downloaders fetch the same N images into fresh folders; ours also decodes and re-encodes every
image (the plain loop only writes the bytes), so the ratio is a lower bound of the transfer
speed-up. Both numbers and their ratio come from one run.

    .venv/bin/python benchmarks/download_throughput.py [--images 2000] [--latency 0 0.02]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from gldboxes.gld import image_relpath  # noqa: E402
from gldboxes.gld_urls import download_url_list  # noqa: E402


def make_images(n_distinct: int, seed: int = 0) -> list[bytes]:
    """Small JPEGs (160x120, ~5-8 KB) with some structure, like thumbnails."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_distinct):
        img = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (7, 7), 0)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out.append(buf.tobytes())
    return out


def _serve(files: dict[str, bytes], latency: float, port_q: Any, stop_ev: Any) -> None:
    from fault_server import Fault, FaultServer

    srv = FaultServer(files).start()
    if latency > 0:
        srv.add_fault("img/*", Fault(delay=latency, times=None))
    port_q.put(srv.port)
    stop_ev.wait()
    srv.stop()


def plain_loop(rows: list[tuple[str, str]], out: Path) -> None:
    """The peer: one session, one request after another, bytes written as received."""
    with requests.Session() as s:
        for image_id, url in rows:
            r = s.get(url, timeout=30)
            r.raise_for_status()
            dest = out / image_relpath(image_id)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(r.content)


def run(n_images: int, latency: float, workers: int, work: Path) -> tuple[float, float]:
    images = make_images(50)
    files = {f"img/{i}.jpg": images[i % len(images)] for i in range(n_images)}
    ctx = mp.get_context("fork")
    port_q, stop_ev = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_serve, args=(files, latency, port_q, stop_ev), daemon=True)
    proc.start()
    try:
        port = port_q.get(timeout=30)
        rows = [(f"{i:016x}", f"http://127.0.0.1:{port}/img/{i}.jpg") for i in range(n_images)]
        csv_path = work / "list.csv"
        csv_path.write_text("id,url\n" + "".join(f"{i},{u}\n" for i, u in rows))
        t0 = time.perf_counter()
        plain_loop(rows, work / "plain")
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = download_url_list(csv_path, work / "ours", workers=workers, progress=False)
        t_ours = time.perf_counter() - t0
        if rep.downloaded != n_images:
            raise RuntimeError(f"ours downloaded {rep.downloaded} of {n_images}")
    finally:
        stop_ev.set()
        proc.join(10)
    return n_images / t_ours, n_images / t_plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument(
        "--latency",
        type=float,
        nargs="+",
        default=[0.0, 0.02],
        help="server delay per request in seconds (simulated network latency)",
    )
    ap.add_argument("--workers", type=int, default=16)
    args = ap.parse_args()
    print(
        f"{args.images} JPEGs of ~{np.mean([len(b) for b in make_images(50)]) / 1024:.1f} KB, "
        f"local server in a separate process, ours with {args.workers} workers + re-encode"
    )
    for latency in args.latency:
        work = Path(tempfile.mkdtemp(prefix="gldboxes-dl-bench-"))
        try:
            ours, plain = run(args.images, latency, args.workers, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(
            f"latency {latency * 1000:5.1f} ms: ours {ours:8.1f} img/s | plain sequential "
            f"requests {plain:8.1f} img/s | ratio {ours / plain:5.2f}x"
        )


if __name__ == "__main__":
    main()
