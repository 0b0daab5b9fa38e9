"""The optimistic write every versioned repository shares (storage/base.py): a row whose
version moved since it was read is not written over (ABORTED, CONCURRENT_UPDATE), and a row
that is gone is NOT_FOUND. The use cases lock the row before they write, so this is the
backstop; here it is driven directly, on both databases."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.app import App
from server.domain.common.errors import Aborted, NotFound
from tests.helpers import Client


async def test_a_stale_tunnel_is_refused_and_a_missing_one_is_not_found(
    app: App, client: Client
) -> None:
    owner = await client.new_user()
    tunnel_id = (await client.tunnel(owner)).name.rsplit("/", 1)[1]
    async with app.db(readonly=True) as uow:
        tunnel = await uow.tunnels.get(tunnel_id)
    assert tunnel is not None
    renamed = replace(tunnel, display_name="first")
    async with app.db() as uow:
        await uow.tunnels.save(renamed, tunnel.version)  # the version it read: written
    with pytest.raises(Aborted) as stale:
        async with app.db() as uow:
            await uow.tunnels.save(replace(tunnel, display_name="second"), tunnel.version)
    assert stale.value.reason == "CONCURRENT_UPDATE"
    async with app.db(readonly=True) as uow:
        kept = await uow.tunnels.get(tunnel_id)
    assert kept is not None
    assert (kept.display_name, kept.version) == ("first", tunnel.version + 1)
    with pytest.raises(NotFound):
        async with app.db() as uow:
            await uow.tunnels.save(replace(tunnel, id="tun_gone"), tunnel.version)
