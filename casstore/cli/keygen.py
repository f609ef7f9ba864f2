"""``casstore keygen``: make a signing key, or print the public key of one."""

from __future__ import annotations

from pathlib import Path

import click

from casstore import signing
from casstore.cli.common import apply_globals, echo, errors, fail, verbose_option


@click.command()
@click.argument("path", metavar="PATH", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--public", is_flag=True, help="Print the public key of the private key at PATH.")
@verbose_option
def keygen(path: Path, public: bool, verbose: bool) -> None:
    """Write a new ed25519 signing key to PATH (mode 0600) and print its public key.

    PATH: the file for the new private key (never overwritten), or with --public the
    private key to read.

    The public key (one line, ed25519:<base64>) goes on stdout: put it in the trusted keys
    of the replicas that should run what this key signs ($CASSTORE_TRUSTED_KEYS). Keep the
    private key where only the saver reads it ($CASSTORE_SIGNING_KEY); see docs/security.md.
    """
    apply_globals(None, None, verbose)
    with errors():
        if public:
            echo(str(signing.load_signing_key(path).public))
            return
        try:
            key = signing.generate(path)
        except FileExistsError:
            fail(f"{path} exists; a signing key is never overwritten (choose another path)")
    echo(str(key))
    echo(f"wrote the private key to {path} (mode 0600); the public key is above", err=True)
