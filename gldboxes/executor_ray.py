"""The Ray engine of the executor: :class:`RayExecutor`, one plain Ray task per shard.

A local Ray by default (its scratch inside the run's work directory, bound to 127.0.0.1), a
cluster through ``RAY_ADDRESS`` (or ``address=``), with Ray's token authentication when a token
is meant for that cluster. Ray is imported inside the methods that need it. The shard model and
the driver it shares with the serial engine are :mod:`gldboxes.executor_base`; choosing an
engine by name is :mod:`gldboxes.executor`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from gldboxes.executor_base import (
    Executor,
    NonRetryableError,
    Resources,
    Shard,
    Stage,
    run_shard,
)
from gldboxes.io import config_hash

__all__ = ["RayExecutor"]

logger = logging.getLogger("gldboxes.executor_ray")

# Ray's unix sockets live under its temp dir: AF_UNIX paths are limited to 107 bytes and Ray adds
# ~66 characters (session_<date>_<pid>/sockets/plasma_store), so longer scratch paths are reached
# through a short symlink in the system temp dir.
_MAX_RAY_TEMP_LEN = 40


class RayExecutor(Executor):
    """One Ray task per shard; local Ray by default, a cluster through ``RAY_ADDRESS``.

    Args:
        work_dir: the run's work directory; a local Ray keeps its scratch (sessions, logs,
            spilled objects) in ``work_dir/ray``.
        num_cpus: CPUs of a local Ray (``None``: all); ignored on a cluster.
        num_gpus: GPUs of a local Ray (``None``: detected); ignored on a cluster.
        address: a cluster address; default ``RAY_ADDRESS`` from the environment, else local.
            A token-auth cluster gets ``$RAY_AUTH_TOKEN``/``$RAY_AUTH_TOKEN_PATH`` when set, or
            ``~/.ray/auth_token`` when the head runs on this machine (:func:`_use_ray_token_for`).
        resources: per-task resources overriding each stage's defaults.
        runtime_env: Ray runtime environment (e.g. ``{"env_vars": {...}}``) for the workers.
        progress: show the tqdm bar over shards.
    """

    engine = "ray"

    def __init__(
        self,
        *,
        work_dir: str | os.PathLike[str],
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        address: str | None = None,
        resources: Resources | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(progress=progress, resources=resources)
        self.work_dir = Path(work_dir)
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.address = address
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self._owned = False

    @property
    def cluster_address(self) -> str | None:
        """The cluster this executor connects to (``None``: a local Ray)."""
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def temp_dir(self) -> Path:
        """Where a local Ray puts its scratch (``work_dir/ray``; maybe through a short link)."""
        real = (self.work_dir / "ray").resolve()
        real.mkdir(parents=True, exist_ok=True)
        if len(str(real)) <= _MAX_RAY_TEMP_LEN:
            return real
        link = Path(tempfile.gettempdir()) / f"gldray-{config_hash({'p': str(real)}, 10)}"
        if link.is_symlink() and Path(os.readlink(link)) != real:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(real, target_is_directory=True)
        return link

    def start(self) -> RayExecutor:
        """``ray.init`` unless Ray is already running in this process."""
        import ray

        if ray.is_initialized():
            return self
        addr = self.cluster_address
        kwargs: dict[str, Any] = {
            "address": addr,
            "include_dashboard": False,
            "log_to_driver": logger.isEnabledFor(logging.DEBUG),
            "configure_logging": False,
        }
        if self.runtime_env:
            kwargs["runtime_env"] = self.runtime_env
        if addr is None:
            kwargs["num_cpus"] = self.num_cpus
            kwargs["num_gpus"] = self.num_gpus
            kwargs["_temp_dir"] = str(self.temp_dir())
            # Loopback only: Ray binds its GCS, raylet, agents and workers to the node IP
            # when that is 127.0.0.1 and to every interface otherwise, and on Linux ray.init
            # swaps "127.0.0.1" for the external IP unless ENABLE_RAY_CLUSTER is off (as on
            # macOS/Windows, $RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). Off for this call only.
            kwargs["_node_ip_address"] = "127.0.0.1"
            logger.info("starting a local Ray (%s CPUs) in %s", self.num_cpus, kwargs["_temp_dir"])
        else:
            logger.info("connecting to the Ray cluster at %s", addr)
            _use_ray_token_for(addr)
        import ray._private.ray_constants as ray_constants

        multi_node = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = multi_node and addr is not None
        try:
            ray.init(**kwargs)
        except Exception as exc:
            if addr is not None and _is_auth_failure(exc):
                source = "--ray-address" if self.address else "RAY_ADDRESS"
                raise ValueError(_auth_help(addr, source)) from None
            raise
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = multi_node
        self._owned = True
        return self

    def shutdown(self) -> None:
        if self._owned:
            import ray

            ray.shutdown()
            self._owned = False

    def _execute(
        self, stage: Stage, shards: Sequence[Shard], out_dir: Path
    ) -> Iterator[tuple[Shard, dict[str, Any] | None, str | None]]:
        import ray

        if not shards:
            return
        self.start()
        res = self.resources or stage.resources
        task = ray.remote(_run_shard_task).options(
            **res.ray_options(),
            max_retries=stage.retries,
            retry_exceptions=True,
            name=f"gldboxes:{stage.name}",
        )
        stage_ref = ray.put(stage)
        refs = {task.remote(stage_ref, s, str(out_dir)): s for s in shards}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                shard = refs[ref]
                try:
                    done = ray.get(ref)
                except Exception as exc:  # RayTaskError, WorkerCrashedError, ...
                    yield shard, None, f"{type(exc).__name__}: {_first_line(exc)}"
                else:
                    if _NOT_RETRIED in done:
                        yield shard, None, str(done[_NOT_RETRIED])
                    else:
                        yield shard, done, None


# Ray's token authentication: `ray start --head` turns it on when RAY_AUTH_MODE is unset and a
# token exists ($RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, which any
# local ray.init() or `ray get-auth-token --generate` writes); a driver given an explicit address
# stays in mode "disabled" unless RAY_AUTH_MODE=token is exported.
_RAY_DEFAULT_TOKEN = Path("~/.ray/auth_token")


def _is_this_machine(addr: str) -> bool:
    """Whether the host of a Ray address (``host:port``) is a loopback or local interface."""
    import ipaddress
    import socket

    host = addr.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0]).split("%")[0]
        if ipaddress.ip_address(ip).is_loopback:
            return True
        try:  # only an address of one of this machine's interfaces can be bound
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.bind((ip, 0))
            return True
        except OSError:
            continue
    return False


def _use_ray_token_for(addr: str) -> None:
    """Connect to ``addr`` with Ray's token authentication when a token is meant for it.

    An explicit ``RAY_AUTH_MODE`` is left as it is. Otherwise token mode is turned on when the
    user exported ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, or when the head runs on this
    machine and ``~/.ray/auth_token`` (the token ``ray start --head`` used) exists; a token is
    never sent to another machine's cluster unasked. Ray's C++ side caches the mode and the
    token, so both are reread here (Ray is not initialised in this process yet).
    """
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    env = os.environ
    if env.get("RAY_AUTH_MODE") is None and (
        env.get("RAY_AUTH_TOKEN")
        or env.get("RAY_AUTH_TOKEN_PATH")
        or (_RAY_DEFAULT_TOKEN.expanduser().is_file() and _is_this_machine(addr))
    ):
        logger.info("using Ray token authentication for %s (RAY_AUTH_MODE=token)", addr)
        env["RAY_AUTH_MODE"] = "token"
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _is_auth_failure(exc: BaseException) -> bool:
    """Whether ``ray.init`` failed because the cluster rejected (or we lacked) the auth token."""
    from ray.exceptions import AuthenticationError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, AuthenticationError) or "InvalidAuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _auth_help(addr: str, source: str) -> str:
    """One line saying what to set when the cluster at ``addr`` refused this driver."""
    mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    if mode != "token":
        sent = f"no token was sent (RAY_AUTH_MODE={mode})"
    elif os.environ.get("RAY_AUTH_TOKEN"):
        sent = "the token in $RAY_AUTH_TOKEN was rejected"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = os.environ["RAY_AUTH_TOKEN_PATH"]
        sent = f"the token in $RAY_AUTH_TOKEN_PATH ({path}) was rejected"
    else:
        sent = f"the token in {_RAY_DEFAULT_TOKEN} was rejected or is missing"
    return (
        f"{source}={addr}: the Ray cluster uses token authentication and {sent}; export "
        "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<output of `ray get-auth-token` on the head> "
        "(or RAY_AUTH_TOKEN_PATH=<a copy of the head's ~/.ray/auth_token>)"
    )


_NOT_RETRIED = "non_retryable_error"


def _run_shard_task(stage: Stage, shard: Shard, out_dir: str) -> dict[str, Any]:
    """:func:`run_shard` as a Ray task: a :class:`NonRetryableError` is returned as
    ``{"non_retryable_error": message}`` instead of raised, so Ray does not retry the task."""
    try:
        return run_shard(stage, shard, out_dir)
    except NonRetryableError as exc:
        return {_NOT_RETRIED: f"{type(exc).__name__}: {exc}"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # RayTaskError prints a traceback; its last line names the original exception.
    return (text[-1] if text else repr(exc))[:500]
