"""Talking to a Label Studio server: the SDK client and a plain token session for the rest.

:func:`connect` gives ``label_studio_sdk.LabelStudio`` (imported lazily); ``_session`` is a
``requests`` session with the token header for endpoints the SDK does not cover, and ``_check``
turns an HTTP error answer into one ``ValueError`` line. Used by :mod:`annotation.campaign` and
:mod:`annotation.raters`.
"""

from __future__ import annotations

from typing import Any

import requests

__all__ = ["connect"]


def connect(url: str, token: str) -> Any:
    """A ``label_studio_sdk.LabelStudio`` client for ``url`` (imported lazily)."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url.rstrip("/"), api_key=token, timeout=120)


def _session(url: str, token: str) -> requests.Session:
    """A plain HTTP session with the token header, for endpoints the SDK does not cover."""
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {token}"
    sess.headers["User-Agent"] = "gldboxes"
    return sess


def _check(resp: requests.Response, what: str) -> Any:
    if resp.status_code >= 400:
        raise ValueError(f"Label Studio {what}: HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json() if resp.content else None
