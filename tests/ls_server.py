"""Test helper: a real Label Studio server started from a cached, migrated template data dir.

The template (``<repo>/.cache/labelstudio-template/<version>-<key>/``) is built once per machine
(``label-studio init``: migrations, admin, legacy token; ~35-135 s) and copied per test module,
so a server is up in ~5-15 s. The Label Studio venv is installed on first use
(``annotation.server.ensure_installed``; a few minutes once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from annotation import server
from annotation.config import NO_LANDMARK_CHOICE, box_to_rect_value

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "labelstudio-template"
ADMIN_EMAIL = "admin@gldboxes.test"
ADMIN_PASSWORD = "gldboxes-test-pw"
ADMIN_TOKEN = "gldboxes-test-token-0123456789"


def template() -> Path:
    """The migrated template data dir (built on first call on this machine), with its login file
    (templates built before the login file existed get it here)."""
    path = server.template_data_dir(
        CACHE, username=ADMIN_EMAIL, password=ADMIN_PASSWORD, token=ADMIN_TOKEN
    )
    if server.read_login(path) is None:
        server.write_login(path, ADMIN_EMAIL, ADMIN_PASSWORD)
    return path


def settings(data_dir: Path, document_root: Path, port: int | None = None) -> server.ServerSettings:
    """Server settings of the test admin on a free port."""
    return server.ServerSettings(
        data_dir=data_dir,
        port=port or server.free_port(),
        username=ADMIN_EMAIL,
        password=ADMIN_PASSWORD,
        token=ADMIN_TOKEN,
        document_root=document_root,
    )


@contextlib.contextmanager
def running_server(data_dir: Path, document_root: Path) -> Iterator[server.ServerSettings]:
    """Copy the template into ``data_dir``, start Label Studio on it, stop it afterwards."""
    server.copy_data_dir(template(), data_dir)
    conf = settings(data_dir, document_root)
    server.start(conf, timeout=180)
    try:
        yield conf
    finally:
        server.stop(data_dir)


def rect(box: tuple[float, float, float, float], w: int, h: int) -> dict[str, Any]:
    """A rater's box ``(ymin, xmin, ymax, xmax)`` on a ``w x h`` image as a Label Studio
    ``rectanglelabels`` result."""
    return {
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": w,
        "original_height": h,
        "image_rotation": 0,
        "value": box_to_rect_value(*box),
    }


#: A rater's "no prominent landmark" answer as a Label Studio ``choices`` result.
FLAG: dict[str, Any] = {
    "from_name": "flag",
    "to_name": "image",
    "type": "choices",
    "value": {"choices": [NO_LANDMARK_CHOICE]},
}
