"""voicechat: LFM2-Audio speech-to-speech over gRPC (voicechat.v1.VoiceChatService)."""

__version__ = "0.1.0"
