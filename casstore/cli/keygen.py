"""``casstore keygen``: make a signing key, or print the public key of one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from casstore import signing
from casstore.cli.common import VerboseOpt, apply_globals, err, errors, fail, out


def keygen(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            dir_okay=False,
            help="File for the new private key (never overwritten), or with --public the "
            "private key to read.",
        ),
    ],
    public: Annotated[
        bool,
        typer.Option("--public", help="Print the public key of the private key at PATH."),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Write a new ed25519 signing key to PATH (mode 0600) and print its public key.

    The public key (one line, ed25519:<base64>) goes on stdout: put it in the trusted keys
    of the replicas that should run what this key signs ($CASSTORE_TRUSTED_KEYS). Keep the
    private key where only the saver reads it ($CASSTORE_SIGNING_KEY); see docs/security.md.
    """
    apply_globals(None, None, verbose)
    with errors():
        if public:
            out.print(str(signing.load_signing_key(path).public))
            return
        try:
            key = signing.generate(path)
        except FileExistsError:
            fail(f"{path} exists; a signing key is never overwritten (choose another path)")
    out.print(str(key))
    err.print(f"wrote the private key to {path} (mode 0600); the public key is above")
