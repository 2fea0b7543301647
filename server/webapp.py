"""The browser client at /app (issue 15): static files built from web/ (node-seal + esbuild,
committed under server/static/app), served with a strict Content-Security-Policy.

The page talks only to this origin (`connect-src 'self'`), loads nothing from elsewhere, runs
WebAssembly without `eval` (`'wasm-unsafe-eval'` only), cannot be framed, and sends no referrer.
The API key is typed by the user; no CORS header is ever set, so other origins cannot call the
API from a browser (closed by default). See docs/SERVICE.md, "Browser client".
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

APP_DIR = Path(__file__).parent / "static" / "app"

CSP = ("default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; "
       "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
HEADERS = {
    b"content-security-policy": CSP.encode(),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"x-frame-options": b"DENY",
    b"cross-origin-opener-policy": b"same-origin",
    b"cache-control": b"no-cache",  # revalidate: a new server version brings a new page
}
TYPES = {".wasm": b"application/wasm", ".js": b"text/javascript; charset=utf-8"}


class PageFiles:
    """StaticFiles with the page's security headers and exact types (SEAL's .wasm must be
    application/wasm for streaming compilation)."""

    def __init__(self, directory: Path = APP_DIR):
        self.files = StaticFiles(directory=directory, html=True, check_dir=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        ctype = next((t for ext, t in TYPES.items() if path.endswith(ext)), None)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                drop = set(HEADERS) | ({b"content-type"} if ctype else set())
                headers = [(k, v) for k, v in msg.get("headers", []) if k.lower() not in drop]
                headers += list(HEADERS.items())
                if ctype:
                    headers.append((b"content-type", ctype))
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.files(scope, receive, send_with_headers)


def available() -> bool:
    return (APP_DIR / "index.html").exists() and (APP_DIR / "app.js").exists()
