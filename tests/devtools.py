"""Drive headless Chromium through the DevTools protocol over a pipe.

``--remote-debugging-pipe`` makes the browser read commands from fd 3 and write replies
and events to fd 4, each a JSON document ended by a NUL byte: no WebSocket client needed.
Only what the tests use: open a page, run a script in it and await its result.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def available() -> bool:
    """Whether Debian's Chromium is installed."""
    return shutil.which(CHROMIUM) is not None


def spki_hash(cert_file: Path) -> str:
    """The base64 SHA-256 of a certificate's public key, as Chromium's
    ``--ignore-certificate-errors-spki-list`` wants it: the browser then trusts the test's
    self-signed certificate (and treats its origin as secure) without a CA store."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class DevToolsError(RuntimeError):
    """The browser answered a command with an error, or a script threw."""


class Browser:
    """One headless Chromium, spoken to over its DevTools pipe."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: tuple[asyncio.StreamReader, asyncio.BaseTransport],
        writer: asyncio.WriteTransport,
    ) -> None:
        self._process = process
        self._reader, self._read_transport = reader
        self._writer = writer
        self._next_id = 0
        self._events: list[dict[str, Any]] = []

    async def send(self, method: str, session: str = "", **params: Any) -> dict[str, Any]:
        """Run one command (in a page's ``session``, if given) and return its result."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self._writer.write(json.dumps(message).encode() + b"\0")
        while True:
            reply = await self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply.get("result", {})  # type: ignore[no-any-return]
            self._events.append(reply)

    async def event(self, method: str, session: str) -> dict[str, Any]:
        """The first event ``method`` of ``session`` (already received or next)."""
        while True:
            for event in self._events:
                if event.get("method") == method and event.get("sessionId") == session:
                    self._events.remove(event)
                    return event
            self._events.append(await self._read())

    async def open(self, url: str) -> Page:
        """A new tab showing ``url``, loaded."""
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Page(self, attached["sessionId"])
        await self.send("Page.enable", page.session)
        navigated = await self.send("Page.navigate", page.session, url=url)
        if navigated.get("errorText"):
            raise DevToolsError(f"{url}: {navigated['errorText']}")
        await self.event("Page.loadEventFired", page.session)
        return page

    async def _read(self) -> dict[str, Any]:
        raw = await self._reader.readuntil(b"\0")
        return json.loads(raw[:-1])  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Ask the browser to quit, and make sure it did."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        try:
            await asyncio.wait_for(self._process.wait(), 10)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        self._writer.close()
        self._read_transport.close()


class Page:
    """A tab: scripts run in it as they would in the page itself."""

    def __init__(self, browser: Browser, session: str) -> None:
        self._browser = browser
        self.session = session

    async def run(self, script: str) -> Any:
        """The value of ``script`` (an expression; a promise is awaited), as JSON."""
        result = await self._browser.send(
            "Runtime.evaluate",
            self.session,
            expression=script,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(details.get("exception", {}).get("description", str(details)))
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(profile: Path, *extra: str) -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile in ``profile``."""
    commands_read, commands_write = os.pipe()
    replies_read, replies_write = os.pipe()
    # The browser reads fd 3 and writes fd 4: a trampoline puts the pipe ends there (taken
    # above 9 first, so that moving one cannot overwrite the other).
    ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, replies_write)]
    for fd in (commands_read, replies_write):
        os.close(fd)
    commands_read, replies_write = ends
    trampoline = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", trampoline, str(commands_read), str(replies_write),
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", *extra,
        pass_fds=(commands_read, replies_write),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    os.close(commands_read)
    os.close(replies_write)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(replies_read, "rb", 0)
    )
    writer, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(commands_write, "wb", 0))
    browser = Browser(process, (reader, read_transport), writer)
    try:
        yield browser
    finally:
        await browser.close()
