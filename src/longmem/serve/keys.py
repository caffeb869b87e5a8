"""Keys per tenant: several users share one server, none sees another's sessions.

A keys file (JSON) lists hashed keys and the sessions each may see:

    {"keys": [{"name": "alice", "sha256": "<hex digest of the key>", "sessions": ["alice-*", "shared"]}]}

``sessions`` are shell-style patterns of session names (``*`` every session). Keys are stored only as
SHA-256 digests; a presented key is hashed and compared with **every** entry by ``hmac.compare_digest``
(no early exit, so the time taken does not tell which entry matched or how many bytes did). A tenant cannot
list, read, write, generate with or delete a session outside its patterns: such a session answers as if it
did not exist (404). ``add_key`` makes a new random key, stores its digest and returns the key once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from longmem.errors import LongMemError
from longmem.files import load_json, save_json

EVERY = ("*",)


@dataclass(frozen=True)
class Tenant:
    """Who is asking, and which sessions they may see."""

    name: str
    sessions: tuple[str, ...] = EVERY  # shell-style patterns of session names

    def may(self, session: str) -> bool:
        return any(fnmatch.fnmatchcase(session, pattern) for pattern in self.sessions)


ANYONE = Tenant("anyone")  # no authentication, or the single bearer token: every session


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Keys:
    """The tenants of a keys file."""

    def __init__(self, entries: list[tuple[str, str, tuple[str, ...]]]):
        self.entries = entries  # (name, sha256 hex, session patterns)

    @classmethod
    def load(cls, path: str | Path) -> "Keys":
        data = load_json(Path(path))
        entries = []
        for i, entry in enumerate(data.get("keys", []) if isinstance(data, dict) else []):
            if not isinstance(entry, dict):
                raise LongMemError(f"{path}: keys[{i}] must be an object")
            name, sha, sessions = entry.get("name"), entry.get("sha256"), entry.get("sessions")
            if not isinstance(name, str) or not name:
                raise LongMemError(f"{path}: keys[{i}].name must be a non-empty string")
            if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise LongMemError(f"{path}: keys[{i}].sha256 must be 64 lowercase hex digits")
            if (not isinstance(sessions, list) or not sessions
                    or not all(isinstance(s, str) and s for s in sessions)):
                raise LongMemError(f"{path}: keys[{i}].sessions must be a non-empty list of name patterns")
            entries.append((name, sha, tuple(sessions)))
        if not entries:
            raise LongMemError(f"{path}: no keys (expected {{\"keys\": [{{\"name\", \"sha256\", \"sessions\"}}]}})")
        return cls(entries)

    def tenant(self, key: str) -> Tenant | None:
        """The tenant holding ``key``, or None; every entry is compared, in constant time each."""
        given = digest(key).encode()
        found = None
        for name, sha, sessions in self.entries:
            if hmac.compare_digest(given, sha.encode()):
                found = Tenant(name, sessions)
        return found


def add_key(path: str | Path, name: str, sessions: list[str]) -> str:
    """Make a new key for ``name`` (allowed ``sessions`` patterns), store its digest in the keys file at
    ``path`` (created if missing; written atomically) and return the key: it is shown once, never stored."""
    path = Path(path)
    if not name or not sessions or not all(sessions):
        raise LongMemError("a key needs a name and at least one session pattern")
    data = load_json(path) if path.exists() else {"keys": []}
    key = "lmk-" + secrets.token_urlsafe(32)
    data.setdefault("keys", []).append({"name": name, "sha256": digest(key), "sessions": list(sessions)})
    save_json(path, data)
    Keys.load(path)  # what was written reads back
    return key
