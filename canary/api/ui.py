"""The status page (`/ui/`): three files from the package, no build step, no external
assets, served with a Content-Security-Policy that allows only this origin's own script,
style and API (no inline script or style, no frames, no forms posting elsewhere). The
page asks for a token once and keeps it in the tab's sessionStorage; loading it needs
none, every API call it makes carries one."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
FILES = {"": ("index.html", "text/html"), "index.html": ("index.html", "text/html"),
         "app.js": ("app.js", "text/javascript"), "style.css": ("style.css", "text/css")}
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cache-Control": "no-cache"}


def _load() -> dict[str, bytes]:
    root = resources.files("canary") / "ui"
    return {name: (root / name).read_bytes() for name, _ in set(FILES.values())}


async def page(request: web.Request) -> web.Response:
    name = request.match_info.get("name", "")
    if name not in FILES:
        raise web.HTTPNotFound(reason=f"no file {name[:60]!r} in the status page")
    file, kind = FILES[name]
    return web.Response(body=request.app[CONTENT][file], content_type=kind, charset="utf-8",
                        headers=HEADERS)


async def to_page(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


page._on_api_thread = True  # type: ignore[attr-defined]
to_page._on_api_thread = True  # type: ignore[attr-defined]
CONTENT = web.AppKey("ui_files", dict[str, bytes])


def add_routes(app: web.Application) -> None:
    app[CONTENT] = _load()  # read once: a page load never touches the disk
    app.router.add_get("/ui", to_page)
    app.router.add_get("/ui/", page)
    app.router.add_get("/ui/{name}", page)
