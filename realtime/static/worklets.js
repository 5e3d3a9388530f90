// Audio worklets of the page: microphone capture and playback with a small jitter buffer.
// Both run on the audio thread at the AudioContext's rate (24 kHz, the session's rate).

// capture: hands each 128-sample block of the microphone to the page (which batches and sends it)
class Capture extends AudioWorkletProcessor {
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) this.port.postMessage(channel.slice(0));
    return true;
  }
}
registerProcessor("capture", Capture);

// player: plays queued PCM; starts once `startMs` are buffered (the jitter buffer), plays silence
// on underrun (counted) and rebuffers; "flush" drops everything at once (barge-in). The queue is
// capped at `maxMs`: older audio is dropped when a burst would exceed it.
class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunks = [];
    this.offset = 0;
    this.buffered = 0;
    this.playing = false;
    this.startSamples = Math.round(sampleRate * 0.08);
    this.maxSamples = sampleRate * 30;
    this.played = 0; // samples of the current response played
    this.underruns = 0;
    this.active = false; // a response is streaming: running dry now is an underrun, not its end
    this.reportIn = 0;
    this.port.onmessage = (e) => {
      const msg = e.data;
      if (msg.type === "audio") {
        this.chunks.push(msg.samples);
        this.buffered += msg.samples.length;
        while (this.buffered > this.maxSamples && this.chunks.length > 1) {
          const dropped = this.chunks.shift();
          this.buffered -= dropped.length - this.offset;
          this.offset = 0;
        }
      } else if (msg.type === "flush") {
        this.chunks = [];
        this.offset = 0;
        this.buffered = 0;
        this.playing = false;
        this.port.postMessage({ type: "flushed", played: this.played });
      } else if (msg.type === "new-response") {
        this.played = 0;
        this.active = true;
      } else if (msg.type === "response-done") {
        this.active = false;
      }
    };
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    if (!this.playing && this.buffered >= this.startSamples) this.playing = true;
    if (this.playing) {
      while (i < out.length && this.chunks.length) {
        const chunk = this.chunks[0];
        const n = Math.min(out.length - i, chunk.length - this.offset);
        out.set(chunk.subarray(this.offset, this.offset + n), i);
        i += n;
        this.offset += n;
        this.buffered -= n;
        this.played += n;
        if (this.offset >= chunk.length) {
          this.chunks.shift();
          this.offset = 0;
        }
      }
      if (i < out.length) {
        // ran dry mid-response: silence now, and wait for the jitter buffer to refill
        if (this.active && i > 0) this.underruns += 1;
        this.playing = false;
      }
    }
    out.fill(0, i);
    if (--this.reportIn <= 0) {
      this.reportIn = 40; // about every 200 ms at 24 kHz
      this.port.postMessage({ type: "stats", buffered: this.buffered, played: this.played, underruns: this.underruns });
    }
    return true;
  }
}
registerProcessor("player", Player);
