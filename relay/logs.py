"""Structured logs: JSON lines when stderr is not a terminal, readable key=value when it is.

No token, secret or signature is ever passed to a logger; as a second line of defence the access
log drops query strings (which may carry `?token=`).
"""

from __future__ import annotations

import logging
import sys

import structlog


class _AccessLogFilter(logging.Filter):
    """For the relay run by plain uvicorn with its access log on (docs/scaling.md): drops query
    strings from uvicorn's access lines, and the lines of streams that opened, which the relay logs
    itself. `relay serve` turns uvicorn's access log off; relay/app.py writes its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn.access records carry (client, method, path_with_query, http_version, status).
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, version, status = record.args
            path = str(path).split("?", 1)[0]
            if path == "/v1/events" and status == 200:
                return False
            record.args = (client, method, path, version, status)
        return True


class _NamedWriter(structlog.WriteLogger):
    """structlog's fast writer, remembering the module that asked for it."""

    def __init__(self, name: str) -> None:
        super().__init__(sys.stderr)
        self.name = name


def _writer(*args: object) -> _NamedWriter:
    return _NamedWriter(str(args[0]) if args else "relay")


def _add_logger_name(
    logger: object, method_name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    event_dict["logger"] = getattr(logger, "name", "relay")
    return event_dict


def configure_logging(level: str = "INFO", *, json_output: bool | None = None) -> None:
    """The relay's own logs go through structlog's native pipeline (a few microseconds a line,
    which matters for one line per client connect); other libraries' through stdlib logging,
    rendered the same way."""
    if json_output is None:
        json_output = not sys.stderr.isatty()
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            _add_logger_name,
            timestamper,
            renderer,
        ],
        logger_factory=_writer,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    # The renderer shows none of these; gathering them costs a system call per record.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's protocol formats a TRACE line for every connection made and lost unless its
    # logger's own level (not the effective one) rules TRACE out.
    logging.getLogger("uvicorn.error").setLevel(level)
    access = logging.getLogger("uvicorn.access")
    access.addFilter(_AccessLogFilter())
    # httpx logs every request URL at INFO; the relay logs its own upstream events instead.
    logging.getLogger("httpx").setLevel(logging.WARNING)
