// The voicechat page: an OpenAI Realtime client in plain JavaScript over /v1/realtime.
// Microphone -> AudioWorklet (24 kHz) -> input_audio_buffer.append every 40 ms;
// response.output_audio.delta -> player worklet (80 ms jitter buffer); barge-in flushes playback
// and truncates the reply to what was heard. `window.voicechat` exposes the state for tests.
"use strict";

const RATE = 24000;
const SEND_MS = 40;
const $ = (id) => document.getElementById(id);

const state = {
  connected: false,
  sessionId: "",
  userTranscripts: [],
  assistantTexts: [],
  audioMs: 0,
  firstAudioMs: [],
  responses: 0,
  errors: [],
  underruns: 0,
  bargeIns: 0,
  truncatedMs: [],
};
window.voicechat = state;

let ws = null;
let ctx = null;
let player = null;
let micStream = null;
let micNode = null;
let pending = [];
let pendingSamples = 0;
let turnEndAt = null; // performance.now() at the end of the user's turn (speech stopped or text sent)
let firstAudioSeen = false;
let current = null; // {id, itemId, el}: the response being received
let playing = null; // {itemId}: the latest response, while the player may still hold its audio
let buffered = 0; // samples the player held at its last report
const userLines = new Map(); // user item id -> its transcript element, placed when the turn is committed

function setStatus(text) { $("status").textContent = text; }

function line(role, text) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  const who = document.createElement("b");
  who.textContent = role === "user" ? "you: " : role === "assistant" ? "model: " : "error: ";
  const body = document.createElement("span");
  body.textContent = text;
  div.append(who, body);
  $("transcript").append(div);
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return body;
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function b64FromInt16(samples) {
  const bytes = new Uint8Array(samples.buffer, samples.byteOffset, samples.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function float32FromB64(b64) {
  const raw = atob(b64);
  const n = raw.length >> 1;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    if (v >= 0x8000) v -= 0x10000;
    out[i] = v / 32768;
  }
  return out;
}

async function ensureAudio() {
  if (ctx) return;
  ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
  await ctx.audioWorklet.addModule("/static/worklets.js");
  player = new AudioWorkletNode(ctx, "player", { outputChannelCount: [1] });
  player.connect(ctx.destination);
  player.port.onmessage = (e) => {
    const msg = e.data;
    if (msg.type === "stats") {
      buffered = msg.buffered;
      if (!buffered && !current) playing = null;
      $("buffer-ms").textContent = Math.round((msg.buffered / RATE) * 1000);
      state.underruns = msg.underruns;
      $("underruns").textContent = msg.underruns;
    }
  };
}

function flushPlayback() {
  return new Promise((resolve) => {
    const listener = (e) => {
      if (e.data.type === "flushed") {
        player.port.removeEventListener("message", listener);
        resolve(e.data.played);
      }
    };
    player.port.addEventListener("message", listener);
    player.port.postMessage({ type: "flush" });
  });
}

async function startMic() {
  await ensureAudio();
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
  });
  const source = ctx.createMediaStreamSource(micStream);
  micNode = new AudioWorkletNode(ctx, "capture");
  micNode.port.onmessage = (e) => {
    const block = e.data;
    let peak = 0;
    for (let i = 0; i < block.length; i++) peak = Math.max(peak, Math.abs(block[i]));
    $("level").value = peak;
    pending.push(block);
    pendingSamples += block.length;
    if (pendingSamples >= (RATE * SEND_MS) / 1000) {
      const pcm = new Int16Array(pendingSamples);
      let o = 0;
      for (const b of pending) {
        for (let i = 0; i < b.length; i++) pcm[o++] = Math.max(-32768, Math.min(32767, Math.round(b[i] * 32767)));
      }
      pending = [];
      pendingSamples = 0;
      send({ type: "input_audio_buffer.append", audio: b64FromInt16(pcm) });
    }
  };
  source.connect(micNode);
  $("mic").classList.add("on");
  $("mic").textContent = "Microphone off";
}

function stopMic() {
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  if (micNode) micNode.disconnect();
  micStream = null;
  micNode = null;
  $("mic").classList.remove("on");
  $("mic").textContent = "Microphone on";
}

async function onSpeechStarted() {
  // barge-in: the reply may still be arriving, or have arrived and still be playing (a model faster
  // than real time ends its response long before its audio is heard)
  const target = current || playing;
  if (!target || !target.itemId || (!current && !buffered)) return;
  playing = null;
  state.bargeIns += 1;
  const played = await flushPlayback(); // stop playing now, then say how much of the reply was heard
  send({ type: "conversation.item.truncate", item_id: target.itemId, content_index: 0,
         audio_end_ms: Math.round((played / RATE) * 1000) });
}

function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      state.sessionId = ev.session.id;
      setStatus("connected: " + ev.session.model);
      send({ type: "session.update", session: { type: "realtime", audio: { input: {
        transcription: { model: ev.session.model },
        turn_detection: { type: "server_vad", silence_duration_ms: 500 } } } } });
      break;
    case "session.updated":
      state.connected = true;
      $("mic").disabled = false;
      $("text").disabled = false;
      break;
    case "input_audio_buffer.speech_started":
      onSpeechStarted();
      break;
    case "input_audio_buffer.speech_stopped":
      turnEndAt = performance.now();
      firstAudioSeen = false;
      break;
    case "input_audio_buffer.committed":
      userLines.set(ev.item_id, line("user", "…"));
      break;
    case "conversation.item.input_audio_transcription.completed": {
      state.userTranscripts.push(ev.transcript);
      const el = userLines.get(ev.item_id);
      userLines.delete(ev.item_id);
      if (el) el.textContent = ev.transcript;
      else line("user", ev.transcript);
      break;
    }
    case "response.created":
      current = { id: ev.response.id, itemId: null, el: line("assistant", "") };
      player.port.postMessage({ type: "new-response" });
      break;
    case "response.output_item.added":
      if (current) current.itemId = ev.item.id;
      playing = { itemId: ev.item.id };
      break;
    case "conversation.item.truncated":
      state.truncatedMs.push(ev.audio_end_ms);
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (current) current.el.textContent += ev.delta;
      break;
    case "response.output_audio.delta": {
      const samples = float32FromB64(ev.delta);
      state.audioMs += (samples.length / RATE) * 1000;
      $("audio-ms").textContent = Math.round(state.audioMs);
      if (!firstAudioSeen && turnEndAt !== null) {
        firstAudioSeen = true;
        const ms = Math.round(performance.now() - turnEndAt);
        state.firstAudioMs.push(ms);
        $("first-audio").textContent = ms + " ms";
      }
      player.port.postMessage({ type: "audio", samples }, [samples.buffer]);
      break;
    }
    case "response.done":
      state.responses += 1;
      if (current) state.assistantTexts.push(current.el.textContent);
      player.port.postMessage({ type: "response-done" });
      current = null;
      break;
    case "error":
      state.errors.push(ev.error);
      line("error", ev.error.message);
      break;
  }
}

async function connect() {
  await ensureAudio();
  await ctx.resume();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const secret = $("secret").value.trim() || new URLSearchParams(location.search).get("client_secret") || "";
  const protocols = ["realtime"];
  if (secret) protocols.push("openai-insecure-api-key." + secret);
  ws = new WebSocket(`${scheme}//${location.host}/v1/realtime?model=lfm2`, protocols);
  setStatus("connecting…");
  ws.onmessage = (e) => onEvent(JSON.parse(e.data));
  ws.onclose = (e) => {
    state.connected = false;
    setStatus(`disconnected (${e.code}${e.reason ? ": " + e.reason : ""})`);
    stopMic();
    $("mic").disabled = true;
    $("text").disabled = true;
    $("connect").textContent = "Connect";
    ws = null;
  };
  $("connect").textContent = "Disconnect";
}

$("connect").onclick = () => (ws ? ws.close(1000) : connect());
$("mic").onclick = () => (micStream ? stopMic() : startMic().catch((err) => line("error", String(err))));
$("text").addEventListener("keydown", (e) => {
  if (e.key !== "Enter" || !e.target.value.trim()) return;
  const text = e.target.value.trim();
  e.target.value = "";
  line("user", text);
  state.userTranscripts.push(text);
  send({ type: "conversation.item.create", item: { type: "message", role: "user",
         content: [{ type: "input_text", text }] } });
  send({ type: "response.create" });
  turnEndAt = performance.now();
  firstAudioSeen = false;
});
// ?autostart=1 connects and opens the microphone at once (used by the page's test)
if (new URLSearchParams(location.search).get("autostart")) {
  connect().then(() => {
    const wait = setInterval(() => {
      if (state.connected) { clearInterval(wait); startMic().catch((err) => line("error", String(err))); }
    }, 50);
  });
}
