"""``casstore explain``: will this host's load find its cache, and if not, why not?"""

from __future__ import annotations

from typing import Any

import click

from casstore import config, explain
from casstore.cli.common import (
    apply_globals,
    echo,
    emit_json,
    errors,
    global_options,
    iso_time,
    json_option,
    local_time,
    mib,
    options,
    trusted_keys_option,
)
from casstore.signing import signer_name, trusted_keys_from


def _tree_json(r: explain.TreeReport) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tree": r.tree,
        "local_dir": r.local_dir,
        "key_id": r.key.id,
        "key": r.key,
        "status": r.status,
    }
    if r.info is not None:
        doc.update(
            files=r.info.files,
            bytes=r.info.bytes,
            last_saved=iso_time(r.info.last_saved),
            signers=[signer_name(s) for s in r.info.signers],
        )
    doc["nearest"] = [
        {
            "key_id": c.key.id,
            "key": c.key,
            "where": c.where,
            "last_saved": iso_time(c.last_saved) if c.last_saved else None,
            "differences": [
                {"factor": d.factor, "stored": d.stored, "here": d.here} for d in c.differences
            ],
        }
        for c in r.nearest
    ]
    return doc


@click.command("explain")
@click.option(
    "--model",
    metavar="MODEL",
    envvar="CASSTORE_MODEL",
    show_envvar=True,
    help="Model fingerprint (default: $CASSTORE_MODEL or default).",
)
@click.option(
    "--scope",
    metavar="SCOPE",
    help="org or deployment (default: $CASSTORE_SCOPE, else org).",
)
@click.option("--vllm", is_flag=True, help="Explain the key of `casstore vllm` instead.")
@trusted_keys_option
@json_option
@global_options
def explain_cmd(
    model: str | None,
    scope: str | None,
    vllm: bool,
    trusted_keys: str | None,
    as_json: bool,
    root: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Say whether each tree load_compile_cache() would restore here is saved, computing
    this host's key as it does; for a miss, list the nearest stored keys and every factor
    that differs. Exit 0 either way."""
    apply_globals(root, threads, verbose)
    with errors():
        choice = config.choose_root(options.root, scope, warn=False)
        found = explain.explain_host(
            choice,
            config.model_fingerprint(model),
            vllm=vllm,
            trusted=trusted_keys_from(trusted_keys),
        )
    if as_json:
        emit_json(
            {
                "root": str(choice.path),
                "root_source": choice.source,
                "scope": choice.scope,
                "store": found.store_exists,
                "model": found.model,
                "trusted_keys": None if found.trusted is None else len(found.trusted.keys),
                "trees": [_tree_json(r) for r in found.trees],
            }
        )
        return
    echo(f"model {found.model}, store {choice.path} (from {choice.source}, scope {choice.scope})")
    if not found.store_exists:
        echo("  no store there yet: every key misses until a first save")
    for r in found.trees:
        head = f"{r.tree:19} {r.key.id[:12]}  "
        signers = ", ".join(signer_name(s, short=True) for s in r.info.signers) if r.info else ""
        if r.status == explain.FOUND and r.info is not None:
            echo(
                f"{head}found: {r.info.files} files, {mib(r.info.bytes)}, last saved "
                f"{local_time(r.info.last_saved)}, {signers}"
            )
            continue
        if r.status == explain.UNTRUSTED:
            echo(f"{head}saved, but no trusted key signed it ({signers}): a load misses")
        else:
            echo(f"{head}missing ({r.key.describe()})")
        if not r.nearest:
            echo("  no other key is stored")
        for c in r.nearest:
            where = f" in {c.where}" if c.where else ""
            saved = f", last saved {local_time(c.last_saved)}" if c.last_saved else ""
            echo(f"  nearest {c.key.id[:12]}{where}{saved}; differs in:")
            for d in c.differences:
                echo(f"    {d.factor:8} stored {d.stored:24} here {d.here}")
