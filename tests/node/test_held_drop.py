"""A payload drop that finds its blob in use frees it once nothing uses it.

Regression test for a defect the real-process fault harness found (soak seed 105, first
schedule generator): a prune dropped a failed deploy's payload while a peer was still
staging it (holding the blob); the delete skipped the held blob and nothing asked again,
so the bytes stayed, named by no live deployment, until the node restarted.
"""

from __future__ import annotations

from helpers import Api, component

from node.appkeys import RECONCILER, Services


async def test_a_drop_that_found_the_blob_held_frees_it_later(api: Api) -> None:
    code, v1 = await api.deploy("web", component(v="1"))
    assert code == 200, v1
    code, v2 = await api.deploy("web", component(v="2"))
    assert code == 200, v2
    services = Services(api.app)
    blobs, store = services.ctx.blobs, services.store
    d1 = await store.get_deployment(v1["deployment_id"])
    assert d1 is not None and d1.payload_hash is not None
    with blobs.holding(d1.payload_hash):  # a stage or a download reading it right now
        code, body = await api.op("delete_deployment_payload", deployment_id=d1.deployment_id)
        assert code == 200 and body["freed_bytes"] == 0, body
        assert blobs.has(d1.payload_hash)
    await api.app[RECONCILER].scan()  # the reconciler's periodic look at everything
    assert not blobs.has(d1.payload_hash)
    assert blobs.deferred() == []
