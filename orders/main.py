"""The ASGI entry point: `uvicorn orders.main:app` (settings from the environment)."""

from orders.app import create_app

app = create_app()
