"""What `GET /v1/events` reads from a request, taken from the ASGI scope in one pass.

Every (re)connection of every client comes through here; Starlette's Request would build a header
view, a cookie jar and a query multi-dict for each. The meaning is the same as Starlette's: the first
of a repeated header, the last of a repeated query parameter, headers and query decoded as Latin-1.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qsl

from starlette.requests import cookie_parser
from starlette.types import Scope

from relay.auth import COOKIE_NAME, InvalidToken

MAX_EVENT_TYPES = 64  # in ?events=


def bearer_token(authorization: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer ...` header value."""
    scheme, _, value = (authorization or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class EventsRequest(NamedTuple):  # a tuple: made on every connection, for the cost of one
    method: str
    authorization: str | None
    cookie: str | None
    last_event_id_header: str | None
    query: dict[str, str]
    client: str | None
    has_origin: bool  # a cross-origin request: CORS rules apply to its response

    @classmethod
    def of(cls, scope: Scope) -> EventsRequest:
        authorization = cookie = last_event_id = None
        has_origin = False
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"cookie" and cookie is None:
                cookie = value.decode("latin-1")
            elif name == b"last-event-id" and last_event_id is None:
                last_event_id = value.decode("latin-1")
            elif name == b"origin":
                has_origin = True
        raw_query: bytes = scope.get("query_string", b"")
        query = (
            dict(parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True))
            if raw_query
            else {}
        )
        client = scope.get("client")
        return cls(
            scope["method"],
            authorization,
            cookie,
            last_event_id,
            query,
            client[0] if client else None,
            has_origin,
        )

    def token(self, allow_query: bool) -> str | None:
        """The subscriber token from the Authorization header, the relay_token cookie, or ?token=."""
        token = bearer_token(self.authorization)
        if token is None and self.cookie:
            token = cookie_parser(self.cookie).get(COOKIE_NAME) or None
        if token:
            return token
        query = self.query.get("token")
        if query is not None and not allow_query:
            raise InvalidToken("query-string tokens are disabled here (auth.allow_query_token)")
        return query or None

    def event_types(self) -> frozenset[str] | None:
        """The types asked for with ?events=, if any; ValueError when the list is unusable."""
        raw = self.query.get("events")
        if raw is None:
            return None
        names = frozenset(name.strip() for name in raw.split(",") if name.strip())
        if not names or len(names) > MAX_EVENT_TYPES:
            raise ValueError(
                f"events= must list 1 to {MAX_EVENT_TYPES} event types, comma-separated"
            )
        return names

    def last_event_id(self) -> str | None:
        return self.last_event_id_header or self.query.get("last_event_id")
