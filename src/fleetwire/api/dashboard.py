"""The dashboard (issue 17): static files from `fleetwire/web/`, `/` on the API's origin.

`GET /` is the page; its scripts and styles are under `/web/`. A Content-Security-Policy
keeps the page to its own origin (scripts, styles, fetch and WebSocket), so a token pasted
into it can only travel to this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",  # the token rides in the fragment, never a referrer anyway
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


def static_files() -> StaticFiles:
    """The page's assets, mounted at /web."""
    return StaticFiles(directory=WEB_DIR)
