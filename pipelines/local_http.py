"""What the two local HTTP servers (`retformer browse`, `retformer serve`) share: the Host-header check
that keeps a server bound to a loopback address from answering a page whose DNS name was rebound to
127.0.0.1 (it could otherwise read the run from the user's browser)."""

from __future__ import annotations

# Host headers a server bound to a loopback address answers (any port); others get 403.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def host_of(header: str | None) -> str | None:
    """The host name of a Host header (`localhost:8000` -> `localhost`, `[::1]:80` -> `::1`), lower case."""
    if not header:
        return None
    host = header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def hosts_answered(bind_host: str) -> frozenset[str] | None:
    """The Host headers a server bound to `bind_host` answers: the loopback names and its own address
    when it is a loopback address, None (any) when it listens beyond this machine."""
    loopback = bind_host in LOOPBACK_HOSTS or bind_host.startswith("127.")
    return LOOPBACK_HOSTS | {bind_host} if loopback else None
