"""GET /wait/{ticket}: the page a customer's browser shows while their order waits in the queue.

The page is one static file (``static/wait.html``, inline CSS and JS) read once at import. The
ticket is not templated into it: the script reads it from the URL and polls
``../v1/queue/{ticket}`` relative to the page, so the page works behind a proxy under a sub-path.
The Content-Security-Policy allows exactly the page's own inline script and style by their
sha256 hashes, fetches to its own origin only, and framing by any storefront."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

PAGE: bytes = resources.files("gateway").joinpath("static/wait.html").read_bytes()
ETAG = f'"{hashlib.sha256(PAGE).hexdigest()[:20]}"'


def _hashes(tag: str) -> str:
    """CSP source expressions for the contents of every inline ``<tag>`` element of the page."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>".encode(), PAGE, flags=re.DOTALL)
    if not blocks:
        raise RuntimeError(f"static/wait.html has no inline <{tag}>")
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(block).digest()).decode()}'" for block in blocks
    )


CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        f"script-src {_hashes('script')}",
        f"style-src {_hashes('style')}",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors *",
    ]
)

HEADERS = {
    "Cache-Control": "no-cache",
    "ETag": ETAG,
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the ticket in the URL is a credential
}


async def wait_page(request: Request) -> Response:
    """The waiting page; the same bytes for every ticket (so a revalidation is usually a 304)."""
    if ETAG in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=HEADERS)
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=HEADERS)
