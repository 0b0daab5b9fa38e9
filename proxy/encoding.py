"""gzip of responses as they stream: each piece is compressed and flushed at once
(``Z_SYNC_FLUSH``), so compression never holds a token back.

Only when the client accepts gzip, the local service did not encode the body itself and
its type is text-like (what compresses; images and archives do not)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

#: Types worth compressing, by prefix or exact name.
COMPRESSIBLE = (
    "text/",
    "application/json",
    "application/x-ndjson",
    "application/javascript",
    "application/xml",
    "application/problem+json",
    "image/svg+xml",
)


class Gzip:
    """A gzip stream written piece by piece."""

    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: the gzip container

    def piece(self, data: bytes) -> bytes:
        """``data`` compressed, flushed so the client can decode it now."""
        return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        """The stream's end (the gzip trailer)."""
        return self._z.flush(zlib.Z_FINISH)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip (``q=0`` refuses it)."""
    for item in accept_encoding.lower().split(","):
        name, _, params = item.strip().partition(";")
        if name.strip() not in {"gzip", "*"}:
            continue
        q = params.strip().removeprefix("q=").strip() if "q=" in params else "1"
        try:
            return float(q) > 0
        except ValueError:
            return False
    return False


def gzip_for(level: int, request: Mapping[str, str], response: Mapping[str, str]) -> Gzip | None:
    """A compressor when this response should be gzipped, else None."""
    if level <= 0 or not accepts_gzip(request.get("Accept-Encoding", "")):
        return None
    if response.get("Content-Encoding") or "no-transform" in response.get("Cache-Control", ""):
        return None
    kind = response.get("Content-Type", "").split(";")[0].strip().lower()
    if not kind.startswith(COMPRESSIBLE):
        return None
    return Gzip(level)
