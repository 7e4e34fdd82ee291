"""uvicorn's httptools protocol with the two things the relay needs and uvicorn lacks.

- A cap on the request head. httptools buffers a header line of any length (uvicorn has a limit for
  h11 only), so one client could make the relay hold megabytes per connection; past `MAX_HEAD_BYTES`
  the request gets a JSON 431 and the connection is closed.
- A way to abort. ASGI can only end a response, and uvicorn then closes the transport, which waits
  until the unsent bytes are written: a cut client that keeps its socket open and never reads would
  keep the connection forever. The scope's `relay.abort` extension drops it at once (TCP reset).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import cast

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = (
    64 * 1024
)  # request line and headers; a token is < 1 KiB, browsers cap cookies near 8 KiB
ABORT_EXTENSION = "relay.abort"

_431_BODY = json.dumps(
    {"error": f"the request head is larger than {MAX_HEAD_BYTES} bytes; send smaller headers"}
).encode()
_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_431_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _431_BODY
)


class RelayHttpProtocol(HttpToolsProtocol):
    _in_head = True  # until the first request's headers are complete
    _head_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self.scope["extensions"] = {ABORT_EXTENSION: {"abort": self.transport.abort}}

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self.logger.warning("request head over %d bytes refused", MAX_HEAD_BYTES)
            self.transport.write(_431)
            self.transport.close()


def abort_of(scope: Scope) -> Callable[[], None] | None:
    """The connection's abort, when the server is this protocol."""
    extension = scope.get("extensions", {}).get(ABORT_EXTENSION)
    return cast("Callable[[], None]", extension["abort"]) if extension else None
