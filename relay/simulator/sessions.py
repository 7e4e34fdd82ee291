"""Account sessions as DialStack issues them: an opaque client secret valid until `expires_at`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# Old sessions are forgotten past this many, so a client minting sessions in a loop cannot
# grow the simulator without bound.
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class Session:
    account_id: str
    client_secret: str
    expires_at: datetime

    def expired(self) -> bool:
        return datetime.now(UTC) >= self.expires_at

    def seconds_left(self) -> float:
        return (self.expires_at - datetime.now(UTC)).total_seconds()

    def to_json(self) -> dict[str, str]:
        # Milliseconds, because tests use sessions that live for a fraction of a second.
        expires_at = self.expires_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "account_id": self.account_id,
            "client_secret": self.client_secret,
            "expires_at": expires_at,
        }


class SessionStore:
    def __init__(self) -> None:
        self._by_secret: dict[str, Session] = {}
        self.created = 0

    def issue(self, account_id: str, lifetime_seconds: float) -> Session:
        self._forget_old()
        session = Session(
            account_id=account_id,
            client_secret=f"cs_{secrets.token_urlsafe(24)}",
            expires_at=datetime.now(UTC) + timedelta(seconds=lifetime_seconds),
        )
        self._by_secret[session.client_secret] = session
        self.created += 1
        return session

    def lookup(self, client_secret: str) -> Session | None:
        """The live session with this secret, or None if unknown, revoked or expired."""
        session = self._by_secret.get(client_secret)
        return session if session is not None and self.is_live(session) else None

    def is_live(self, session: Session) -> bool:
        return self._by_secret.get(session.client_secret) is session and not session.expired()

    def revoke_all(self) -> None:
        self._by_secret.clear()

    def _forget_old(self) -> None:
        for secret, session in list(self._by_secret.items()):
            if session.expired():
                del self._by_secret[secret]
        while len(self._by_secret) >= MAX_SESSIONS:
            del self._by_secret[next(iter(self._by_secret))]
