"""The least a server on the relay's stack does for an SSE client: the floor of CPU per connection.

uvicorn with the relay's own configuration (uvloop, httptools, relay/http_protocol.py, the same
garbage-collector tuning) and a minimal ASGI app: every request gets the relay's stream headers and
one `connected` event, and the connection is held until the client leaves. No token, no hub, no log
line. `python -m bench.floor` measures it with the bench's own clients.

    python -m bench.empty_sse --port 8082
"""

from __future__ import annotations

import argparse

import uvicorn
from starlette.types import Receive, Scope, Send

from relay.serve import tune_garbage_collector
from relay.serving import uvicorn_config
from relay.stream import STREAM_HEADERS, connected_frame

_HEADERS = [(k.lower().encode(), v.encode()) for k, v in STREAM_HEADERS.items()]
_CONNECTED = connected_frame("acct_floor", 3000)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _CONNECTED, "more_body": True})
    while (await receive())["type"] != "http.disconnect":
        pass


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.empty_sse", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    args = parser.parse_args()
    config = uvicorn_config(app, host=args.host, port=args.port, log_level="warning")
    tune_garbage_collector()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
