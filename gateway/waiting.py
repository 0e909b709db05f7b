"""GET /wait/{ticket}: the page a customer's browser shows while their order waits in the queue.

The page is one static file (``static/wait.html``, inline CSS and JS) read once at import. The
ticket is not templated into it: the script reads it from the URL and polls
``../v1/queue/{ticket}`` relative to the page, so the page works behind a proxy under a sub-path.
The Content-Security-Policy allows exactly the page's own inline script and style by their
sha256 hashes, fetches to its own origin only, and framing by any storefront."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from ordergate.gateway.pages import StaticPage

PAGE = StaticPage("wait.html", frame_ancestors="*")  # any storefront may frame it


async def wait_page(request: Request) -> Response:
    """The waiting page; the same bytes for every ticket (so a revalidation is usually a 304)."""
    return PAGE.response(request)
