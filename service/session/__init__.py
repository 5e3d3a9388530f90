"""One Converse stream: the session, in parts that each own one concern.

- `shell`: `ChatSession`, the stream shell (reader, writer, watchdog, lifecycle);
- `turn_control`: `TurnControl`, turns from audio, text and commits; speculation and barge-in;
- `speculation`: `Speculator`, the speculative response of a session and the history edits that wait for it;
- `ledger`: `PlaybackLedger`, what the client heard of the latest response, and truncation;
- `responder`: `Responder`, running responses one after another;
- `stream`: `Stream`, what the parts share;
- `wire`: the one mapping between the session's domain events and requests and the contract.
"""

from service.runtime import Runtime
from service.session.shell import CLIENT_GONE, ChatSession

__all__ = ["CLIENT_GONE", "ChatSession", "Runtime"]
