"""An attacking client in its own process (so that its own work does not load the server's
event loop, which a test shares with its in-process clients): `python -m tests.fairness_attacker
truncate|transcribe|never-read|long TARGET`. Runs until killed."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import grpc

from tests.helpers import audio, commit, manual_config, text, tone
from voicechat.v1 import voicechat_pb2 as pb
from voicechat.v1 import voicechat_pb2_grpc as pb_grpc


def truncate_flood() -> Iterator[pb.ConverseRequest]:
    """A reply that ends, then cuts of it as fast as the stream takes them."""
    yield manual_config()
    yield text("#frames=20 a reply to cut")
    time.sleep(1.0)
    n = 0
    while True:
        yield pb.ConverseRequest(truncate=pb.TruncateResponse(response_id="resp_1", audio_played_ms=n % 800))
        n += 1


def transcription_flood() -> Iterator[pb.ConverseRequest]:
    """Short spoken turns committed back to back, input transcription on."""
    yield manual_config(input_transcription=True)
    pcm = tone(0.3)
    while True:
        yield audio(pcm)
        yield commit()
        time.sleep(0.01)


def never_read() -> Iterator[pb.ConverseRequest]:
    """Long replies asked for, never read (the caller does not iterate the responses)."""
    yield manual_config()
    for n in range(10_000):
        yield text(f"#frames=400 flood {n}")
        time.sleep(0.05)


def long_replies() -> Iterator[pb.ConverseRequest]:
    """A long reply, read as it comes, and another as soon as it ends."""
    yield manual_config()
    for n in range(1000):
        yield text(f"#frames=3000 a long story {n}")
        time.sleep(0.05)


ATTACKS = {"long": long_replies, "truncate": truncate_flood, "transcribe": transcription_flood, "never-read": never_read}


def main(kind: str, target: str) -> None:
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.VoiceChatServiceStub(channel)
    calls = [stub.Converse(ATTACKS[kind]()) for _ in range(4 if kind in ("never-read", "long") else 1)]
    print("attacking", flush=True)
    if kind == "never-read":
        time.sleep(3600)
    def keep_attacking(call: grpc.Call) -> None:
        while True:  # the server may end a stream it finds abusive (e.g. acknowledgements it cannot send): again
            try:
                for _ in call:
                    pass
            except grpc.RpcError:
                pass
            call = stub.Converse(ATTACKS[kind]())

    threads = [threading.Thread(target=keep_attacking, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
