"""Clients of voicechat.v1: an importable asyncio client (`clients.aio`), a
file/command-line client (`python -m clients.file`), a microphone client
(`python -m clients.mic`) and a Node.js example (`clients/node/converse.js`)."""
