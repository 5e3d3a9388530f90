#!/usr/bin/env node
// One typed-text turn over voicechat.v1 Converse, from Node.js.
//
//   node clients/node/converse.js --target 127.0.0.1:50051 --text "Hello"
//   node clients/node/converse.js --text "Hello" --json --out reply.wav
//
// The contract is loaded at run time from proto/voicechat/v1/voicechat.proto
// (@grpc/proto-loader); nothing is generated. The turn is sent in push-to-talk
// mode: `config`, then `text`, then a half-close, so the server answers and
// ends the stream. Text deltas are printed as they arrive, then a summary
// (status, audio bytes and milliseconds received, events). With --json every
// output line is a JSON object: {"type":"text_delta",...} lines, then one
// {"type":"summary",...} line.
//
// Exit status: 0 when the response completed, 1 otherwise (gRPC errors are
// reported on stderr as "error: CODE: details"), 2 on bad usage.

'use strict';

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'voicechat/v1/voicechat.proto';
const OUTPUT_RATE = 24000;

const USAGE = `usage: node clients/node/converse.js --text TEXT [options]
  --target HOST:PORT   server address [env VOICECHAT_TARGET; default 127.0.0.1:50051]
  --tls                use TLS (default: on for port 443)
  --ca-file FILE       PEM CA certificates to trust
  --token TOKEN        bearer token [env VOICECHAT_TOKEN]
  --trace              ask for the server's metrics (printed in --json mode)
  --json               JSON lines instead of plain text
  --out FILE           save the reply audio as a WAV file
  --timeout SECONDS    deadline of the call [60]`;

function parseArgs(argv) {
  const args = {
    target: process.env.VOICECHAT_TARGET || '127.0.0.1:50051',
    token: process.env.VOICECHAT_TOKEN || '',
    text: '',
    tls: null,
    caFile: '',
    trace: false,
    json: false,
    out: '',
    timeout: 60,
  };
  const valued = { '--target': 'target', '--text': 'text', '--token': 'token', '--ca-file': 'caFile', '--out': 'out' };
  for (let i = 0; i < argv.length; i += 1) {
    const flag = argv[i];
    if (flag in valued) {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      args[valued[flag]] = argv[++i];
    } else if (flag === '--timeout') {
      args.timeout = Number(argv[++i]);
      if (!(args.timeout > 0)) throw new Error('--timeout needs a positive number');
    } else if (flag === '--tls') {
      args.tls = true;
    } else if (flag === '--no-tls') {
      args.tls = false;
    } else if (flag === '--trace') {
      args.trace = true;
    } else if (flag === '--json') {
      args.json = true;
    } else if (flag === '-h' || flag === '--help') {
      console.log(USAGE);
      process.exit(0);
    } else {
      throw new Error(`unknown argument ${flag}`);
    }
  }
  if (!args.text) throw new Error('--text is required');
  if (args.tls === null) args.tls = args.target.endsWith(':443');
  return args;
}

function loadService() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto: response_id, pcm16, ...
    longs: String, // ts_ms and seq are 64-bit
    enums: String, // "RESPONSE_STATUS_COMPLETED"
    defaults: true,
    oneofs: true, // message.event names the event that is set
  });
  return grpc.loadPackageDefinition(definition).voicechat.v1.VoiceChatService;
}

function wavFile(pcm, rate) {
  const header = Buffer.alloc(44);
  header.write('RIFF', 0);
  header.writeUInt32LE(36 + pcm.length, 4);
  header.write('WAVEfmt ', 8);
  header.writeUInt32LE(16, 16); // fmt chunk size
  header.writeUInt16LE(1, 20); // PCM
  header.writeUInt16LE(1, 22); // mono
  header.writeUInt32LE(rate, 24);
  header.writeUInt32LE(rate * 2, 28); // bytes per second
  header.writeUInt16LE(2, 32); // bytes per frame
  header.writeUInt16LE(16, 34); // bits per sample
  header.write('data', 36);
  header.writeUInt32LE(pcm.length, 40);
  return Buffer.concat([header, pcm]);
}

function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    console.error(`error: ${err.message}\n${USAGE}`);
    process.exit(2);
  }
  const Service = loadService();
  const credentials = args.tls
    ? grpc.credentials.createSsl(args.caFile ? fs.readFileSync(args.caFile) : null)
    : grpc.credentials.createInsecure();
  const client = new Service(args.target, credentials);
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set('authorization', `Bearer ${args.token}`);
  if (args.trace) metadata.set('x-trace', '1');

  const emit = (type, fields) => {
    if (args.json) process.stdout.write(`${JSON.stringify({ type, ...fields })}\n`);
  };
  const summary = { status: '', text: '', audio_bytes: 0, audio_ms: 0, events: 0, session_id: '', response_id: '' };
  const audio = [];
  let firstTs = null;
  const started = Date.now();

  const call = client.Converse(metadata, { deadline: Date.now() + args.timeout * 1000 });
  call.on('data', (message) => {
    summary.events += 1;
    const latencyMs = Date.now() - Number(message.ts_ms);
    const event = message[message.event];
    switch (message.event) {
      case 'session_started':
        summary.session_id = event.session_id;
        emit('session_started', { session_id: event.session_id, model: event.model });
        break;
      case 'response_started':
        summary.response_id = event.response_id;
        break;
      case 'text_delta':
        if (firstTs === null) firstTs = Date.now();
        if (args.json) emit('text_delta', { text: event.text, latency_ms: latencyMs });
        else process.stdout.write(event.text);
        break;
      case 'audio_chunk':
        summary.audio_bytes += event.pcm16.length;
        audio.push(event.pcm16);
        break;
      case 'response_ended':
        summary.status = event.status.replace('RESPONSE_STATUS_', '');
        summary.text = event.text;
        summary.audio_ms = event.audio_ms;
        if (!args.json) process.stdout.write('\n');
        break;
      case 'metrics':
        if (event.response) emit('metrics', { response_id: event.response_id, ...event.response });
        break;
      case 'error':
        console.error(`server error: ${event.code}: ${event.message}`);
        break;
      default:
        break;
    }
  });
  let failed = false;
  call.on('error', (err) => {
    failed = true;
    const code = grpc.status[err.code] || String(err.code);
    emit('error', { code, details: err.details || err.message });
    console.error(`error: ${code}: ${err.details || err.message}`);
    process.exitCode = 1;
    client.close();
  });
  call.on('end', () => {
    if (failed) return; // the error was reported
    client.close();
    summary.first_text_ms = firstTs === null ? null : firstTs - started;
    summary.total_ms = Date.now() - started;
    if (args.out) fs.writeFileSync(args.out, wavFile(Buffer.concat(audio), OUTPUT_RATE));
    if (args.json) {
      emit('summary', summary);
    } else {
      console.log(
        `status: ${summary.status || 'none'}, audio: ${summary.audio_bytes} bytes (${summary.audio_ms} ms), ` +
          `events: ${summary.events}`,
      );
    }
    if (process.exitCode === undefined) process.exitCode = summary.status === 'COMPLETED' ? 0 : 1;
  });

  call.write({ config: { turn_detection: { mode: 'TURN_DETECTION_MODE_MANUAL' }, client_label: 'node-client' } });
  call.write({ text: { text: args.text } });
  call.end(); // half-close: the server answers the turn, then ends the stream
}

main();
