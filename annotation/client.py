"""Talking to a Label Studio server: the SDK client and a plain token session for the rest.

:func:`connect` gives ``label_studio_sdk.LabelStudio`` (imported lazily); :func:`token_session`
is a ``requests`` session with the token header for endpoints the SDK does not cover, and
:func:`checked_json` turns an HTTP error answer into one ``ValueError`` line. Used by
:mod:`annotation.campaign` and :mod:`annotation.raters`.
"""

from __future__ import annotations

from typing import Any

import requests

__all__ = [
    "checked_json",
    "connect",
    "token_session",
]


def connect(url: str, token: str) -> Any:
    """A ``label_studio_sdk.LabelStudio`` client for ``url`` (imported lazily)."""
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url.rstrip("/"), api_key=token, timeout=120)


def token_session(url: str, token: str) -> requests.Session:
    """A plain HTTP session with the token header, for endpoints the SDK does not cover.

    ``url`` is not stored: callers join it to each endpoint path themselves.
    """
    sess = requests.Session()
    sess.headers["Authorization"] = f"Token {token}"
    sess.headers["User-Agent"] = "gldboxes"
    return sess


def checked_json(resp: requests.Response, what: str) -> Any:
    """The JSON body of a Label Studio response (None when empty), ``what`` naming the call.

    Raises:
        ValueError: when the response is an HTTP error (status >= 400), with its first 300
            characters.
    """
    if resp.status_code >= 400:
        raise ValueError(f"Label Studio {what}: HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json() if resp.content else None
