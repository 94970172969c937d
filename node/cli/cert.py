"""``cairn cert``: the cluster CA and node certificates (:mod:`replication.tls`).

Exit codes: 0 done; 1 a certificate cannot be made (bad name or host, no CA, an unusable
existing file); 2 a directory that cannot be written.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click

from node.cli.common import EXIT_FAILED, EXIT_USAGE, fail, json_option, print_json

__all__ = ["cert"]


def _os_failure(what: str, e: OSError) -> NoReturn:
    from node.cli.api.errors import describe_os_error

    fail(f"cannot write {what}: {describe_os_error(e)}", EXIT_USAGE)


@click.group()
def cert() -> None:
    """Create the cluster CA and node certificates."""


@cert.command("init-ca")
@click.option("--dir", "ca_dir", required=True, type=click.Path(path_type=Path), help="CA dir")
@click.option("--days", default=3650, show_default=True, type=click.IntRange(min=1))
@json_option
def cert_init_ca(ca_dir: Path, days: int, as_json: bool) -> None:
    """Create the cluster CA in DIR (ca.pem, ca.key), or reuse the one there."""
    from replication.errors import CertificateError
    from replication.tls import cluster_id_for_ca, init_ca

    existed = (ca_dir / "ca.pem").exists()
    try:
        files = init_ca(ca_dir, days=days)
        cluster_id = cluster_id_for_ca(files.cert.read_bytes())
    except CertificateError as e:
        fail(str(e), EXIT_FAILED)
    except OSError as e:
        _os_failure(f"the CA in {ca_dir}", e)
    if as_json:
        print_json({"ca_dir": str(ca_dir), "certificate": str(files.cert), "key": str(files.key),
                    "cluster_id": cluster_id, "created": not existed})  # fmt: skip
        return
    click.echo(f"{'reused the CA' if existed else 'created a CA'} in {ca_dir}")
    click.echo(f"  certificate: {files.cert}")
    click.echo(f"  key:         {files.key} (mode 0600; only `cairn cert issue` needs it)")
    click.echo(f"  cluster id:  {cluster_id}")


@cert.command("issue")
@click.option("--ca-dir", required=True, type=click.Path(path_type=Path), help="CA dir")
@click.option("--node", "node_name", required=True, help="node name (as in node.name)")
@click.option("--host", "hosts", multiple=True, required=True, help="IP or DNS name (repeat)")
@click.option("--out-dir", default=Path("."), type=click.Path(path_type=Path), show_default=True)
@click.option("--days", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--force", is_flag=True, help="issue a new certificate even if one is still good")
@json_option
def cert_issue(
    ca_dir: Path, node_name: str, hosts: tuple[str, ...], out_dir: Path, days: int, force: bool,
    as_json: bool,
) -> None:  # fmt: skip
    """Issue NODE.pem and NODE.key (mode 0600) signed by the CA in --ca-dir.

    The certificate names the node and every --host as subject alternative names. A
    still-valid certificate for the same node, CA and hosts is kept unless --force.
    """
    from cryptography import x509

    from replication.errors import CertificateError
    from replication.tls import issue_node_cert

    try:
        files = issue_node_cert(ca_dir, out_dir, node_name, hosts, days=days, force=force)
        until = x509.load_pem_x509_certificate(files.cert.read_bytes()).not_valid_after_utc
    except CertificateError as e:
        fail(str(e), EXIT_FAILED)
    except OSError as e:
        _os_failure(f"the certificate of {node_name} in {out_dir}", e)
    if as_json:
        valid_until = until.isoformat(timespec="seconds")
        print_json({"node": node_name, "certificate": str(files.cert), "key": str(files.key),
                    "hosts": list(hosts), "valid_until": valid_until})  # fmt: skip
        return
    click.echo(f"certificate for node {node_name}: {files.cert}")
    click.echo(f"  key:   {files.key} (mode 0600)")
    click.echo(f"  hosts: {', '.join(hosts)}")
    click.echo(f"  valid until {until.isoformat(timespec='seconds')}")
