"""One Converse stream: the session and its parts.

- `shell`: `ChatSession`, the stream shell (reader, writer, watchdog, lifecycle);
- `wire`: the one mapping between the session's domain events and requests and the contract.
"""

from service.session.shell import CLIENT_GONE, ChatSession, Runtime

__all__ = ["CLIENT_GONE", "ChatSession", "Runtime"]
