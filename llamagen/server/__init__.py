"""``llamagen serve``: an OpenAI- and Anthropic-compatible HTTP server over llamagen.AsyncEngine.

Needs the ``server`` extra (``pip install "llamagen[server]"``: fastapi, uvicorn, pydantic,
prometheus_client).  ``create_app`` builds the ASGI app; ``llamagen serve`` runs it with uvicorn.
"""
from llamagen.server.app import create_app

__all__ = ["create_app"]
