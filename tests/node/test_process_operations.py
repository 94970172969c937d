"""Every operation of the registry, once, through a real ``cairn node run`` process."""

from __future__ import annotations

import base64
import hashlib
import urllib.request
from pathlib import Path
from typing import Any

from helpers import component
from procs import ADMIN_PASSWORD, ADMIN_USER, NodeProcess

from node.app import registry


def _payload(node: NodeProcess, deployment_id: str) -> tuple[int, bytes]:
    body = f'{{"operation": "get_deployment_payload", "deployment_id": "{deployment_id}"}}'
    req = urllib.request.Request(node.url + "/", data=body.encode(), method="POST")
    token = base64.b64encode(f"{ADMIN_USER}:{ADMIN_PASSWORD}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read()


def test_every_operation_answers_on_a_real_node(tmp_path: Path) -> None:
    node = NodeProcess("n1", tmp_path)
    # A log as a supervised [run] process leaves it (deploys do not start one yet).
    log_dir = node.data_dir / "run" / "components" / "web"
    log_dir.mkdir(parents=True)
    (log_dir / "output.log").write_text("2024-01-02T03:04:05.678Z stdout listening\n")
    node.start()
    done: set[str] = set()

    def ok(operation: str, **fields: Any) -> Any:
        status, body = node.op(operation, fields=fields)
        assert status == 200, (operation, status, body)
        done.add(operation)
        return body

    try:
        v1, v2 = component(v="1"), component(v="2", install="echo hi")
        first = ok("deploy_component", project="web", payload=base64.b64encode(v1).decode())
        second = ok("deploy_component", project="web", payload=base64.b64encode(v2).decode())
        listing = ok("list_deployments", project="web")
        assert listing["total"] == 2
        record = ok("get_deployment", deployment_id=second["deployment_id"])
        assert (
            record["status"] == "success"
            and record["payload_hash"] == hashlib.sha256(v2).hexdigest()
        )
        status, data = _payload(node, first["deployment_id"])
        assert status == 200 and data == v1
        done.add("get_deployment_payload")
        comps = ok("get_components")
        assert comps["components"][0]["deployment_id"] == second["deployment_id"]
        ok("pin_deployment", deployment_id=second["deployment_id"])
        ok("prune_deployment_payloads", dry_run=True)
        freed = ok("delete_deployment_payload", deployment_id=first["deployment_id"])
        assert freed["freed_bytes"] == len(v1)
        ok("drop_component", project="web")
        assert ok("cluster_status")["node"] == "n1"
        assert ok("get_session")["username"] == "admin"
        ok("add_node", name="n9", url="wss://127.0.0.1:1")
        ok("remove_node", name="n9")
        ok("add_role", role="reader", permission={"operations": ["list_deployments"]})
        ok("alter_role", role="reader", permission={"operations": ["get_deployment"]})
        assert [r["role"] for r in ok("list_roles")] == ["reader", "super_user"]
        ok("add_user", username="bob", password="bob-password-1", role="reader")
        ok("alter_user", username="bob", active=False)
        assert {u["username"] for u in ok("list_users")} == {"admin", "bob"}
        ok("drop_user", username="bob")
        ok("drop_role", role="reader")
        logs = ok("get_component_logs", project="web", lines=5)
        assert logs["lines"] == [{"t": 1704164645678, "stream": "stdout", "line": "listening"}]
        audit = ok("read_audit_log", table="hdb_deployment")
        assert {e["key"] for e in audit["entries"]} >= {first["deployment_id"]}
        assert done == set(registry().names()), set(registry().names()) ^ done
    finally:
        assert node.stop() == 0
