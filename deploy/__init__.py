"""Deployment of the voice-chat service (Modal: `deploy/modal_app.py`)."""
