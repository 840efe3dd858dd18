"""`fluxframe serve`: one loaded deployment behind an HTTP API with a durable queue (see fluxframe.serve.service
for the queue and the worker, fluxframe.serve.app for the routes, fluxframe.serve.ray for Ray Serve scale-out).

Secure by default: every /v1 route needs a bearer token (``fluxframe serve token add NAME``; only its hash is
stored). A server without tokens does not start; ``--insecure-no-auth`` serves without them on a loopback address
only, and says so loudly.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
from pathlib import Path
from typing import Any

from fluxframe.errors import ConfigError

log = logging.getLogger("fluxframe.serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth(host: str, *, tokens: list[str], insecure_no_auth: bool) -> None:
    """Refuse what secure-by-default refuses: no tokens (unless --insecure-no-auth), and --insecure-no-auth
    anywhere but on a loopback address."""
    if insecure_no_auth:
        if not is_loopback(host):
            raise ConfigError(f"--insecure-no-auth serves on a loopback address only (127.0.0.1, ::1), not {host}",
                              key="serve.host")
        log.warning("SERVING WITHOUT AUTHENTICATION (--insecure-no-auth): anyone on this machine can generate "
                    "images; the audit log names them 'anonymous'. For demos on loopback only.")
        return
    if not tokens:
        raise ConfigError("no API tokens: add one with `fluxframe serve token add NAME --config ...` "
                          "(or, for a demo on 127.0.0.1 only, pass --insecure-no-auth)", key="serve")


def lock_state(state_dir: Path) -> Any:
    """One server per state folder: an exclusive lock held for the process's life (its file object)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    handle = open(state_dir / "serve.lock", "a+")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(f"{state_dir}: another `fluxframe serve` is using this state folder",
                          key="serve.state_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def open_server(config: Any, host: str | None, port: int | None, *, insecure_no_auth: bool,
                ) -> tuple[str, int, Any]:
    """What every way of serving does first: the address ([serve] unless given), the state folder's lock (one
    server per folder), the token check of ``check_auth``. (host, port, the lock to close at the end)."""
    from fluxframe.serve.store import Store

    host = host or config.serve.host
    port = config.serve.port if port is None else port
    lock = lock_state(config.serve_state_dir)
    try:
        store = Store.for_config(config)
        try:
            check_auth(host, tokens=store.token_names(), insecure_no_auth=insecure_no_auth)
        finally:
            store.close()
    except BaseException:
        lock.close()
        raise
    return host, port, lock


def announce(what: str, host: str, port: int) -> None:
    log.warning("%s: http://%s:%s/ (API docs at /docs)", what, host if ":" not in host else f"[{host}]", port)


def serve(config: Any, *, host: str | None = None, port: int | None = None, insecure_no_auth: bool = False,
          log_level: str = "info") -> None:
    """Run the HTTP service for ``config`` until interrupted (uvicorn)."""
    import uvicorn

    from fluxframe.serve.app import create_app
    from fluxframe.serve.service import Service

    host, port, lock = open_server(config, host, port, insecure_no_auth=insecure_no_auth)
    try:
        app = create_app(Service(config), insecure_no_auth=insecure_no_auth)
        announce("fluxframe serve", host, port)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        lock.close()
