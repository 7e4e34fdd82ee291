"""`relay serve`: the relay under uvicorn (uvloop and httptools), logs configured, until SIGTERM."""

from __future__ import annotations

import gc
import signal

from relay.app import create_app
from relay.config import Settings
from relay.logs import configure_logging
from relay.serving import DrainingServer, uvicorn_config


def serve(settings: Settings) -> int:
    configure_logging()
    app = create_app(settings)
    config = uvicorn_config(
        app,
        trusted_proxies=settings.server.trusted_proxies,
        host=settings.server.host,
        port=settings.server.port,
        timeout_graceful_shutdown=10,
    )
    # uvicorn re-raises the SIGTERM it handled once it has shut down; the handler it then restores
    # is this one, so a drained relay exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    tune_garbage_collector()
    DrainingServer(config, app).run()
    return 0


def tune_garbage_collector() -> None:
    """Each connection allocates a few hundred container objects that live as long as it does;
    with CPython's default thresholds (a young collection every 700 allocations) 10,000 clients
    connecting spent about a third of the relay's CPU in the cycle collector. What the start-up
    loaded is frozen out of every collection, and young collections run every 50,000 allocations:
    the cyclic garbage between two (abandoned tasks, exceptions) stays a few megabytes.

    Whatever the thresholds, every object an open stream keeps (about 50, most of them uvicorn's)
    is walked once in a young and once in a middle collection, and a connection's objects are
    cyclic garbage once it closes, so the collector cannot be left off: keeping few objects per
    stream is what lowers its share."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)
