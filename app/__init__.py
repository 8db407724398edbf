"""Web layer: settings, ChatService, Gradio tabs, HTTP API, auth. Nothing imports app."""
