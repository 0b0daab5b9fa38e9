"""``python -m gateway`` as a real child process in front of a real upstream."""

from __future__ import annotations

import asyncio
import sys

import httpx
import pytest

from tests.gateway.echo_proto import DESCRIPTOR_SET
from tests.processes import ROOT, gateway_serving

pytestmark = pytest.mark.slow


async def test_standalone_gateway_serves_any_annotated_service(echo_upstream: int) -> None:
    flags = ("--strict", "--cors-origin", "https://app.example")
    async with (
        gateway_serving(DESCRIPTOR_SET, echo_upstream, *flags) as gateway,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}") as http,
    ):
        thing = await http.get("/v1/things/t-1", params={"extra": "x"})
        assert thing.status_code == 200
        assert thing.json() == {
            "name": "things/t-1",
            "note": "extra=x",
            "tags": [],
            "size": "0",
        }
        strict = await http.get("/v1/things/t-1", params={"unknown": "1"})
        assert strict.status_code == 400
        assert strict.json()["details"][1]["fieldViolations"][0]["field"] == "unknown"
        failed = await http.get("/v1/fail/7")
        assert failed.status_code == 403
        assert failed.json()["details"][0]["reason"] == "TEST_REASON"
        spec = (await http.get("/openapi.json")).json()
        assert "/v1/things/{thing}" in spec["paths"]
        cors = await http.get("/v1/things/a", headers={"origin": "https://app.example"})
        assert cors.headers["access-control-allow-origin"] == "https://app.example"
    assert gateway.process.returncode == 0  # SIGTERM: a clean stop


async def test_bad_descriptor_set_is_refused(tmp_path: object) -> None:
    from pathlib import Path

    empty = Path(str(tmp_path)) / "empty.binpb"
    empty.write_bytes(b"")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "--descriptor-set", str(empty),
        "--upstream", "127.0.0.1:1", "--port", "0",
        cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"no service" in err
