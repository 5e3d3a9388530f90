"""An OpenAI-Realtime-compatible WebSocket bridge to voicechat.v1 Converse, and a browser page."""
