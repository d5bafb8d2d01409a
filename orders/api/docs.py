"""/docs (Swagger UI) and /redoc, with the copies of their scripts, style sheet and icon
that the fastapi-offline package ships: nothing from a CDN, so the pages load on an
offline or locked-down cluster. None of this is in the OpenAPI description."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import Mount

ASSETS_PATH = "/docs/assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"

router = APIRouter(tags=["documentation"], include_in_schema=False)

# The files under ASSETS_PATH (swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png).
assets = Mount(ASSETS_PATH, app=StaticFiles(directory=ASSETS_DIR), name="docs-assets")


def _urls(request: Request) -> tuple[str, str]:
    """The OpenAPI URL and the assets' prefix, under the proxy's root path if any."""
    root = request.scope.get("root_path", "").rstrip("/")
    return root + (request.app.openapi_url or "/openapi.json"), root + ASSETS_PATH


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    openapi_url, assets_url = _urls(request)
    return get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{assets_url}/swagger-ui-bundle.js",
        swagger_css_url=f"{assets_url}/swagger-ui.css",
        swagger_favicon_url=f"{assets_url}/favicon.png",
        # No "valid" badge fetched from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    openapi_url, assets_url = _urls(request)
    return get_redoc_html(
        openapi_url=openapi_url,
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{assets_url}/redoc.standalone.js",
        redoc_favicon_url=f"{assets_url}/favicon.png",
        with_google_fonts=False,
    )
