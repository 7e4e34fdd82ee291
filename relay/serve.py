"""`relay serve`: the relay under uvicorn (uvloop and httptools), logs configured, until SIGTERM."""

from __future__ import annotations

import uvicorn

from relay.app import create_app
from relay.config import Settings
from relay.logs import configure_logging
from relay.serving import DrainingServer


def serve(settings: Settings) -> int:
    configure_logging()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=True,
        timeout_graceful_shutdown=10,
    )
    DrainingServer(config, app).run()
    return 0
