"""export-server-credentials and import-server-credentials: a host joins with one file."""

from __future__ import annotations

from pathlib import Path

import click

from popguard import paths
from popguard.cli.context import AppContext, pass_app
from popguard.errors import UserError
from popguard.net.server_credentials import install_bundle, read_bundle, server_pairs, write_bundle
from popguard.net.tls import TlsMaterial


@click.command("export-server-credentials")
@click.argument("server")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The file to write (mode 0600; never over an existing one).",
)
@pass_app
def export_server_credentials(app: AppContext, server: str, out: Path) -> None:
    """Write SERVER's certificates and keys, the CA certificate and the health API token
    into one file, for `import-server-credentials` on the host that runs SERVER. Only on
    the host holding the organization's CA key; that key never goes into the file."""
    # Imported here: the health API (aiohttp) is not what the other commands load.
    from popguard.health.api import ensure_token

    tls = TlsMaterial.of(app.data)
    # The host that made the organization holds the CA (it makes one if it has none
    # yet); a host that joined has only its certificate.
    if not tls.ca_key_file.exists() and (not tls.may_make_ca or tls.ca_certificate_file.exists()):
        raise UserError(
            f"this host does not hold the organization's CA key ({tls.ca_key_file}): export "
            "on the host where the organization was first made"
        )
    with app.directory() as directory:
        host = directory.get_server(server)
        settings, _ = directory.pop_settings(host.name)
        organization = directory.organization_id()
    if out.exists():
        raise UserError(f"{out} exists: credentials are never written over a file")
    pairs = server_pairs(tls, host.name, host.roles, host.address, settings.X509CertificateName)
    write_bundle(out, tls, host.name, organization, pairs, ensure_token(app.data))
    click.echo(
        f"wrote the credentials of {host.name} ({', '.join(n for n, _, _ in pairs)}) to {out}: "
        "it holds private keys; move it to the host of "
        f"{host.name} and run `popguard import-server-credentials {out.name}` there"
    )


@click.command("import-server-credentials")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_app
def import_server_credentials(app: AppContext, file: Path) -> None:
    """Install the credentials of one server, written by `export-server-credentials`,
    in this host's data folder (its directory must be the organization's: a
    `[directory]` section in DATA/popguard.toml)."""
    bundle = read_bundle(file)
    with app.directory() as directory:
        known = {s.name.lower(): s.name for s in directory.list_servers()}
        organization = directory.organization_id()
        where = directory.location.describe()
    if bundle.server.lower() not in known:
        raise UserError(
            f"{file}: server {bundle.server} is not in the directory {where} (is "
            f"[directory] in {app.data / 'popguard.toml'} the organization's?)"
        )
    if bundle.organization != organization:
        raise UserError(
            f"{file}: made for another organization ({bundle.organization}) than the one of "
            f"the directory {where} ({organization})"
        )
    tls = TlsMaterial.of(app.data)
    installed = install_bundle(tls, bundle, file)
    token_file = paths.api_token_file(app.data)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    previous = token_file.read_text().strip() if token_file.exists() else None
    if previous != bundle.api_token.strip():
        temporary = token_file.with_suffix(".tmp")
        temporary.write_text(bundle.api_token.strip() + "\n")
        temporary.chmod(0o600)
        temporary.replace(token_file)
        installed.append(token_file)
    click.echo(f"installed the credentials of {known[bundle.server.lower()]}:")
    for path in installed:
        click.echo(f"  {path}")
    if previous is not None and previous != bundle.api_token.strip():
        click.echo(
            "the health API token changed: restart this host's health services "
            "(restart-service health --server NAME)"
        )


COMMANDS = [export_server_credentials, import_server_credentials]
