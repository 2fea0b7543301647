"""heinfer_server: the FastAPI service that evaluates compiled models on ciphertexts.

Run it with `heinfer serve` (or `python -m heinfer_server`); configure it with HEINFER_*
environment variables or flags (docs/SERVICE.md). `create_app(settings)` builds the ASGI app.
"""
