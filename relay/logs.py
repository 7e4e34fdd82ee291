"""Structured logs: JSON lines when stderr is not a terminal, readable key=value when it is.

No token, secret or signature is ever passed to a logger; as a second line of defence the access
log drops query strings (which may carry `?token=`).
"""

from __future__ import annotations

import logging
import sys

import structlog


class _DropQueryStrings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn.access records carry (client, method, path_with_query, http_version, status).
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            record.args = (client, method, str(path).split("?", 1)[0], version, status)
        return True


def configure_logging(level: str = "INFO", *, json_output: bool | None = None) -> None:
    if json_output is None:
        json_output = not sys.stderr.isatty()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    access = logging.getLogger("uvicorn.access")
    access.addFilter(_DropQueryStrings())
    # httpx logs every request URL at INFO; the relay logs its own upstream events instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
