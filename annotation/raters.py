"""The raters of a Label Studio organisation: sign up (or log in), list, remove.

Label Studio adds a user to the organisation only through its invite link and hands a user's API
token only to that user, so :func:`add_rater` signs up / logs in as the rater and returns a
:class:`Rater` with its token. :func:`remove_rater` takes a member out of the organisation (its
annotations stay attributed to it) and records the e-mail in ``<data dir>/raters/removed.json``
(:func:`removed_raters`), since Label Studio renames removed users "Deleted".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from annotation.client import checked_json, token_session
from gldboxes.io import read_json, write_json

__all__ = ["Rater", "add_rater", "list_raters", "remove_rater", "removed_raters"]


@dataclass(frozen=True, slots=True)
class Rater:
    """A Label Studio user who annotates: id, e-mail and API token (keep the token secret)."""

    id: int
    email: str
    token: str

    def __repr__(self) -> str:  # never print the token
        return f"Rater(id={self.id}, email={self.email!r})"


def add_rater(url: str, admin_token: str, email: str, password: str) -> Rater:
    """Sign a rater up through the organisation's invite link (or log in if the e-mail exists).

    Label Studio only adds a user to the organisation via its invite link (signup without it is
    disabled on our servers) and only hands a user's API token to that user, so this signs up /
    logs in as the rater (``/user/signup/?token=...``, ``/user/login/``) and reads
    ``/api/current-user/token``.
    """
    base = url.rstrip("/")
    admin = token_session(url, admin_token)
    users = checked_json(admin.get(f"{base}/api/users/", timeout=60), "list users")
    exists = any(u.get("email") == email for u in users)
    sess = requests.Session()
    if exists:
        page = f"{base}/user/login/"
    else:
        invite = checked_json(admin.get(f"{base}/api/invite", timeout=60), "get the invite link")
        page = f"{base}/user/signup/?token={invite['token']}"
    sess.get(page, timeout=60)
    csrf = sess.cookies.get("csrftoken", "")
    resp = sess.post(
        page,
        data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
        headers={"Referer": page},
        timeout=60,
        allow_redirects=False,
    )
    if resp.status_code not in (200, 302):
        raise ValueError(
            f"Label Studio {'login' if exists else 'signup'} of {email} failed: "
            f"HTTP {resp.status_code}"
        )
    tok = sess.get(f"{base}/api/current-user/token", timeout=60)
    who = sess.get(f"{base}/api/current-user/whoami", timeout=60)
    if tok.status_code != 200 or who.status_code != 200 or "token" not in tok.json():
        raise ValueError(
            f"Label Studio {'login' if exists else 'signup'} of {email} failed "
            f"(wrong password, or a password too short/common?): "
            f"HTTP {tok.status_code}"
        )
    return Rater(int(who.json()["id"]), email, str(tok.json()["token"]))


def _users(url: str, token: str) -> list[dict[str, Any]]:
    """The organisation's active members (``/api/organizations/<id>/memberships``) as user dicts.

    Label Studio lists removed members too, renamed "Deleted" (no e-mail): they are left out.
    """
    base = url.rstrip("/")
    sess = token_session(url, token)
    orgs = checked_json(sess.get(f"{base}/api/organizations/", timeout=60), "list organizations")
    if not orgs:
        raise ValueError(f"Label Studio at {url}: no organization")
    out: list[dict[str, Any]] = []
    page = 1
    while True:
        body = checked_json(
            sess.get(
                f"{base}/api/organizations/{int(orgs[0]['id'])}/memberships",
                params={"page": str(page), "page_size": "1000"},
                timeout=60,
            ),
            "list organization members",
        )
        out += [dict(m["user"]) for m in body["results"] if "@" in str(m["user"]["email"])]
        if not body.get("next"):
            return out
        page += 1


def list_raters(url: str, token: str) -> list[dict[str, Any]]:
    """The users of the organisation: ``id``, ``email``, ``admin`` (the token's own user),
    ``last_activity``, in id order."""
    me = checked_json(
        token_session(url, token).get(f"{url.rstrip('/')}/api/current-user/whoami", timeout=60),
        "who am I",
    )
    return [
        {
            "id": int(u["id"]),
            "email": str(u["email"]),
            "admin": int(u["id"]) == int(me["id"]),
            "last_activity": u.get("last_activity"),
        }
        for u in sorted(_users(url, token), key=lambda u: int(u["id"]))
    ]


def remove_rater(
    url: str, admin_token: str, email: str, *, data_dir: str | os.PathLike[str] | None = None
) -> int:
    """Take a rater out of the organisation (their annotations stay, attributed to them).

    Label Studio soft-deletes the membership (``DELETE /api/organizations/<org>/memberships/
    <user>/``): the user can no longer open the projects; deleting the user instead would
    orphan their annotations (``completed_by`` becomes null). Label Studio then names the user
    "Deleted", so the e-mail is recorded in ``<data_dir>/raters/removed.json`` for exports
    (:func:`removed_raters`).

    Returns:
        The removed user's id.

    Raises:
        ValueError: no member with that e-mail, or it is the admin itself.
    """
    base = url.rstrip("/")
    found = [u for u in list_raters(url, admin_token) if u["email"] == email]
    if not found:
        raise ValueError(f"rater {email}: not a member of the Label Studio organization at {url}")
    if found[0]["admin"]:
        raise ValueError(f"rater {email}: is the admin; refusing to remove it")
    sess = token_session(url, admin_token)
    orgs = checked_json(sess.get(f"{base}/api/organizations/", timeout=60), "list organizations")
    uid = int(found[0]["id"])
    if data_dir is not None:
        path = Path(data_dir) / "raters" / "removed.json"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        known = {**removed_raters(data_dir), str(uid): email}
        write_json(path, {"format_version": 1, "users": known})
    checked_json(
        sess.delete(
            f"{base}/api/organizations/{int(orgs[0]['id'])}/memberships/{uid}/", timeout=60
        ),
        f"remove {email}",
    )
    return uid


def removed_raters(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """``{user id: e-mail}`` of the raters :func:`remove_rater` took out (``{}`` when none)."""
    path = Path(data_dir) / "raters" / "removed.json"
    if not path.exists():
        return {}
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("users"), dict):
        raise ValueError(f"{path}: not a removed-raters file (needs a 'users' mapping)")
    return {str(k): str(v) for k, v in obj["users"].items()}
