"""Run a server with its output appended, secrets masked, to an owner-only log file.

``python logpipe.py LOG -- COMMAND [ARGS...]`` starts ``COMMAND`` as a child (same session and
process group, so :func:`annotation.server.stop` signals both), copies each line it writes on
stdout/stderr to ``LOG`` (created or re-moded 0600) through :func:`redact`, and exits with the
command's exit code once the command has exited and its output is drained.

Why: Label Studio's request log writes ``GET /user/signup/?token=<invite token>``; the
organisation's invite token lets anyone join it, so no log we write may hold it (nor an API
token in ``Authorization: Token ...`` form). The wrapper ignores SIGINT/SIGTERM after starting
the command: a stop signal reaches the whole group, the command shuts down, and its last lines
are still written. Standard library only: it runs without the package on ``sys.path``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

__all__ = ["REDACTED", "main", "redact"]

REDACTED = "[REDACTED]"

# Values of query parameters that carry credentials, also percent-encoded inside another
# parameter (``?next=/user/signup/%3Ftoken%3D...``, where an encoded ``&`` ends the value).
_QUERY_SECRET = re.compile(
    r"(?i)((?:[?&;]|%3F|%26)(?:[a-z_]*token|api_?key|key|password|secret)(?:=|%3D))"
    r"[^&;\s\"'#%]*(?:%(?!26)[0-9A-F]{2}[^&;\s\"'#%]*)*"
)
# ``Token <key>`` / ``Bearer <key>`` credentials (Authorization header values).
_AUTH_SECRET = re.compile(r"\b(Token|Bearer)(\s+)[A-Za-z0-9._~+/=-]{8,}")


def redact(line: str) -> str:
    """``line`` with credential values replaced by ``[REDACTED]`` (parameter names are kept)."""
    line = _QUERY_SECRET.sub(lambda m: m.group(1) + REDACTED, line)
    return _AUTH_SECRET.sub(lambda m: m.group(1) + m.group(2) + REDACTED, line)


def main(argv: list[str]) -> int:
    """``LOG -- COMMAND...``: run ``COMMAND``, log its redacted output, return its exit code."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: logpipe.py LOG -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    fd = os.open(argv[0], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab", buffering=0) as log:
        proc = subprocess.Popen(
            argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # after Popen: the child keeps defaults
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.decode("utf-8", errors="surrogateescape")
            log.write(redact(text).encode("utf-8", errors="surrogateescape"))
        code = proc.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
