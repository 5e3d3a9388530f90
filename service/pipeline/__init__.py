"""One response: a generation request to the engine, and its output consumers.

The engine (`service.engine`) generates on its own thread and hands every
step to the event loop through a `StepSink` that uses `call_soon_threadsafe`
(`response`). On the loop the steps become domain events (`service.events`)
that the session's writer sends in order:

- text arrives detokenized from the engine (a partial UTF-8 character is held
  back there) and goes out as a TextDelta at once;
- the audio consumer (`audio_out`) decodes frames in a worker thread with a
  streaming decoder: first as soon as `first_frames` exist (the fast path),
  then in strides that double up to `max_stride` as the backlog allows, and
  re-frames the PCM into fixed-size chunks.

A speculative response (started before its turn is committed) writes into a
`HeldOutput` (`held`) instead: nothing reaches the client until `promote()`,
and the engine pauses it at its first audio frame.

A response speaks through an `EventSink` (the session maps its events to the
contract); it knows no protobuf. Frames and tokens of one response are
bounded by its max_new_tokens, so the step buffers need no further bound; what
the client has not read is bounded by the session's outbox.
"""

from service.pipeline.audio_out import SAMPLES_PER_MS, OutputPolicy
from service.pipeline.held import HeldOutput
from service.pipeline.response import ResponseResult, ResponseRun, UserInput

__all__ = ["SAMPLES_PER_MS", "HeldOutput", "OutputPolicy", "ResponseResult", "ResponseRun", "UserInput"]
