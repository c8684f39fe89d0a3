"""The operators' dashboard at ``/`` and the API documentation at ``/docs``, served from
this package, with nothing fetched from another origin.

How it is built, and why:

- **A small front end over the JSON API**, in ``static/``: native ES modules
  (``app.js`` and the modules it imports) rendered with Preact through htm's tagged
  templates, so there is no build step, at run time or before. Everything it shows comes
  from the documented ``/api/v1`` routes, the ones the CLI and scripts use: the roles,
  bounds and every status are enforced and tested there once (the route-role table,
  schemathesis) rather than again for a set of HTML fragments. Preact keeps a re-render
  from losing what the operator is doing (a half-typed filter, an open confirmation, an
  error not yet dismissed) while the page polls.
- **Libraries from the npm registry at known versions, vendored**: ``package.json`` and
  ``package-lock.json`` pin Preact, htm, Chart.js and ``swagger-ui-dist``; ``make
  dashboard-assets`` installs exactly those (``npm ci``) and ``vendor.mjs`` copies the
  files served, their licenses and a ``versions.json`` into ``static/vendor/``, which is
  committed, so installing edgefleet needs neither Node nor a network.
- **The token stays in the tab**: the operator pastes an API token; it is kept in
  ``sessionStorage`` (gone with the tab, never in a URL or a cookie) and sent as
  ``Authorization: Bearer``. The page answers with a strict Content-Security-Policy
  (scripts from this origin only, the import map by its hash, no inline script, no
  framing), so an injected script has no way in to read it.
- **Polling, not server-sent events**: ``EventSource`` cannot send an ``Authorization``
  header, and the token must not travel in a URL or a cookie; a page polls the JSON it
  shows every 2 s while it is visible.
- ``/docs`` is FastAPI's Swagger UI page pointed at the vendored ``swagger-ui-dist``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_DIR", "add_dashboard"]

STATIC_DIR = Path(__file__).parent / "static"
_IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.S)


def _content_security_policy(page: str) -> str:
    """Scripts from this origin and the page's import map (by its hash), nothing else."""
    found = _IMPORT_MAP.search(page)
    if found is None:
        raise RuntimeError(f"{STATIC_DIR / 'index.html'} has no import map")
    digest = base64.b64encode(hashlib.sha256(found.group(1).encode()).digest()).decode()
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src 'self' 'sha256-{digest}'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


def add_dashboard(app: FastAPI) -> None:
    """``GET /`` (the dashboard), ``/static/…`` (its files and the vendored libraries) and
    ``/docs`` (Swagger UI from those files). Create ``app`` with ``docs_url=None``."""
    page = (STATIC_DIR / "index.html").read_text()
    headers = {
        "Content-Security-Policy": _content_security_policy(page),
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    files = StaticFiles(directory=STATIC_DIR)

    @app.get("/", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    @app.api_route("/static/{path:path}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static(path: str, request: Request) -> Response:
        """The dashboard's files; an ETag lets browsers revalidate them cheaply."""
        response = await files.get_response(path, request.scope)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}/static/vendor/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/static/vendor/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/vendor/swagger-favicon-32x32.png",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
        )

    async def swagger_ui_redirect(_request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route("/docs", swagger_ui, include_in_schema=False)
    app.add_route("/docs/oauth2-redirect", swagger_ui_redirect, include_in_schema=False)
