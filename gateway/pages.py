"""Self-contained static pages (the customer's waiting page, the operators' dashboard).

Each page is one file under ``static/`` with inline CSS and JS, read once at import. Its
Content-Security-Policy allows exactly the page's own inline script and style by their sha256
hashes and fetches to its own origin only; the same bytes go to everyone, so a revalidation is
usually a 304.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response


class StaticPage:
    """``static/<name>`` served with its ETag and CSP; ``frame_ancestors`` says who may frame it."""

    def __init__(self, name: str, frame_ancestors: str) -> None:
        self.name = name
        self.body: bytes = (
            resources.files("ordergate.gateway").joinpath(f"static/{name}").read_bytes()
        )
        self.etag = f'"{hashlib.sha256(self.body).hexdigest()[:20]}"'
        csp = "; ".join(
            [
                "default-src 'none'",
                f"script-src {self._hashes('script')}",
                f"style-src {self._hashes('style')}",
                "connect-src 'self'",
                "img-src 'self' data:",
                "base-uri 'none'",
                "form-action 'none'",
                f"frame-ancestors {frame_ancestors}",
            ]
        )
        self.headers = {
            "Cache-Control": "no-cache",
            "ETag": self.etag,
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",  # a ticket or token in the URL is a credential
        }

    def _hashes(self, tag: str) -> str:
        """CSP source expressions for the contents of every inline ``<tag>`` element."""
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>".encode(), self.body, flags=re.DOTALL)
        if not blocks:
            raise RuntimeError(f"static/{self.name} has no inline <{tag}>")
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks
        )

    def response(self, request: Request) -> Response:
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=self.headers)
        return Response(self.body, media_type="text/html; charset=utf-8", headers=self.headers)
