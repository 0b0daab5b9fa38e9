"""``/api/docs``: Swagger UI served from the files of the ``swagger-ui-py`` package.

Nothing comes from a CDN: the page, its scripts and styles are local, and the page's
Content-Security-Policy allows only this origin.
"""

from __future__ import annotations

import importlib.resources
import mimetypes
from functools import cache

PREFIX = "/api/docs"
ASSETS = (
    "swagger-ui.css",
    "index.css",
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "favicon-32x32.png",
    "favicon-16x16.png",
)
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>{title}</title>
    <link rel="stylesheet" type="text/css" href="{prefix}/swagger-ui.css">
    <link rel="stylesheet" type="text/css" href="{prefix}/index.css">
    <link rel="icon" type="image/png" href="{prefix}/favicon-32x32.png" sizes="32x32">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="{prefix}/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="{prefix}/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
    <script src="{prefix}/init.js" charset="UTF-8"></script>
  </body>
</html>
"""
INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout",
  });
};
"""


@cache
def asset(name: str) -> tuple[bytes, str] | None:
    """(content, content type) of a Swagger UI file, or ``None``."""
    if name not in ASSETS:
        return None
    data = (importlib.resources.files("swagger_ui") / "static" / name).read_bytes()
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if kind.startswith("text/") or kind.endswith("javascript"):
        kind += "; charset=utf-8"
    return data, kind


def page(title: str) -> bytes:
    """The docs page."""
    return PAGE.format(title=title, prefix=PREFIX).encode()


def initializer() -> bytes:
    """The script that points Swagger UI at ``/openapi.json``."""
    return INIT.encode()
