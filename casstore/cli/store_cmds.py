"""Commands that save, load and inspect keys: save, load, ls, show, verify, stats, du."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from casstore import constants
from casstore.cli.common import (
    EXIT_INCOMPLETE,
    apply_globals,
    build_key,
    duration_text,
    echo,
    emit_json,
    errors,
    exit_with,
    fail,
    global_options,
    iso_time,
    json_option,
    key_options,
    key_ref_argument,
    local_time,
    mib,
    open_store,
    paint,
    parse_duration,
    parse_size,
    print_table,
    progress,
    signing_key_option,
    trusted_keys_option,
    usage_error,
    warn,
)

if TYPE_CHECKING:
    from casstore.store import KeyInfo, Store

# Extra factors in the order `ls` shows them; any other follows, by name.
FACTOR_ORDER = ("tree", "device", "cpu", "python", "triton")


@click.command()
@click.argument(
    "directory",
    metavar="DIR",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@key_options
@click.option(
    "--max-size-mb",
    type=click.IntRange(min=0),
    metavar="N",
    help="Refuse trees larger than this many MiB.",
)
@signing_key_option
@json_option
@global_options
def save(
    directory: Path,
    torch: str | None,
    arch: str | None,
    model: str,
    tree: str,
    extra: tuple[str, ...],
    max_size_mb: int | None,
    signing_key: str | None,
    as_json: bool,
    root: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Save DIR under a key; only chunks the store lacks are uploaded.

    DIR: the directory to save.
    """
    apply_globals(root, threads, verbose)
    with errors():
        key = build_key(torch, arch, model, tree, extra)  # first: a key error creates no store
        store = open_store(signing_key=signing_key, sign=True)
        with progress("saving", not as_json) as on_progress:
            report = store.save(
                directory,
                key,
                max_bytes=max_size_mb * 2**20 if max_size_mb is not None else None,
                progress=on_progress,
            )
    saved = report.manifest is not None
    if as_json:
        if report.files == 0:
            warn(f"nothing saved: {directory} holds no files")
        emit_json(
            {
                **dataclasses.asdict(report),
                "key": report.key,
                "key_id": report.key.id,
                "saved": saved,
                "signer": str(store.signing_key.public) if store.signing_key else None,
            }
        )
    elif report.files == 0:
        echo(f"nothing saved: {directory} holds no files")
    else:
        signed = f", signed by {store.signing_key.public}" if store.signing_key else ""
        echo(
            f"saved {key}{signed}"
            if saved
            else f"nothing new: {key} already holds these files{signed}"
        )
        echo(
            f"  {report.files} files ({mib(report.bytes)}), {report.changed_files} new or "
            f"changed, {report.new_chunks} new chunks ({mib(report.new_bytes)}, "
            f"{mib(report.stored_bytes)} compressed) in {report.seconds:.2f}s"
        )
    if report.skipped and not as_json:
        echo(
            f"  skipped {len(report.skipped)}: "
            + ", ".join(f"{p} ({why})" for p, why in report.skipped[:5])
            + (" …" if len(report.skipped) > 5 else "")
        )


def _check_writable(directory: Path) -> None:
    """One clear error for a destination this user cannot write, instead of one warning per
    file. (A destination that does not exist yet is created by the load, which fails with
    one line where that is impossible.)"""
    if not directory.is_dir():
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=constants.TEMP_PREFIX, dir=directory)
    except OSError as e:
        fail(f"cannot write to {directory}: {e.strerror or e}")
    os.close(fd)
    os.unlink(probe)


@click.command()
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@key_options
@click.option("--key", "key_id", metavar="ID", help="Key id (or prefix) instead of the key fields.")
@click.option(
    "--max-size",
    metavar="SIZE",
    help="Refuse keys larger than this (500M, 10G), before writing anything. Default: no cap.",
)
@trusted_keys_option
@json_option
@global_options
def load(
    directory: Path,
    torch: str | None,
    arch: str | None,
    model: str,
    tree: str,
    extra: tuple[str, ...],
    key_id: str | None,
    max_size: str | None,
    trusted_keys: str | None,
    as_json: bool,
    root: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Restore a saved key into DIR, fetching only files not already present.

    DIR: the directory to restore into (created if needed).

    With trusted keys (--trusted-keys, $CASSTORE_TRUSTED_KEYS), only manifests they signed
    are used; a key without one is not found (exit 3) and nothing is written.
    """
    apply_globals(root, threads, verbose)
    max_bytes = parse_size(max_size, "--max-size") if max_size is not None else None
    with errors():
        store = open_store(create=False, trusted_keys=trusted_keys, trust=True)
        key = store.resolve(key_id) if key_id else build_key(torch, arch, model, tree, extra)
        _check_writable(directory)
        with progress("loading", not as_json) as on_progress:
            report = store.load(key, directory, max_bytes=max_bytes, progress=on_progress)
    if as_json:
        emit_json({**dataclasses.asdict(report), "key": report.key, "key_id": report.key.id})
    else:
        echo(f"loaded {key}")
        echo(
            f"  {report.written} written, {report.skipped} already present, "
            f"{len(report.missing)} missing; fetched {mib(report.bytes_fetched)} "
            f"in {report.seconds:.2f}s"
        )
    if report.missing:  # the load logged a warning naming them
        exit_with(EXIT_INCOMPLETE)


def _last_used(store: Store, info: KeyInfo) -> float:
    """The newer of the key's last save and its last use (its access marker), as gc sees
    it for --max-age and --max-size."""
    from casstore.store import Store

    marker = store.backend.stat(Store.access_key(info.key.id))
    return max(info.last_saved, marker.mtime) if marker else info.last_saved


def _factor_names(infos: list[KeyInfo]) -> list[str]:
    names = {name for i in infos for name in i.key.extra}
    known = [n for n in FACTOR_ORDER if n in names]
    return known + sorted(names - set(known))


@click.command("ls")
@json_option
@global_options
def list_keys(as_json: bool, root: str | None, threads: int | None, verbose: bool) -> None:
    """List the saved keys with every factor, size and last use."""
    from casstore import usage
    from casstore.signing import signer_name

    apply_globals(root, threads, verbose)
    with errors():
        store = open_store(create=False)
        infos = list(store.keys())
        used = {i.key.id: _last_used(store, i) for i in infos}
        uses = usage.by_key(usage.read(store.backend))
    no_use = usage.KeyUse()
    if as_json:
        emit_json(
            [
                {
                    "key_id": i.key.id,
                    "key": i.key,
                    "manifests": i.manifests,
                    "files": i.files,
                    "bytes": i.bytes,
                    "last_saved": iso_time(i.last_saved),
                    "last_used": iso_time(used[i.key.id]),
                    "loads": uses.get(i.key.id, no_use).loads,
                    "last_load": iso_time(last)
                    if (last := uses.get(i.key.id, no_use).last_load)
                    else None,
                    "signers": [signer_name(s) for s in i.signers],
                }
                for i in infos
            ]
        )
        return
    from rich.table import Table

    factors = _factor_names(infos)
    table = Table(
        "key_id",
        "torch",
        "arch",
        "model",
        *factors,
        "files",
        "size",
        "saves",
        "loads",
        "last saved",
        "last used",
        "signed by",
    )
    for i in infos:
        table.add_row(
            i.key.id[:12],
            i.key.torch,
            i.key.arch,
            i.key.model,
            *(i.key.extra.get(name, "-") for name in factors),
            str(i.files),
            mib(i.bytes),
            str(i.manifests),
            str(uses.get(i.key.id, no_use).loads),
            local_time(i.last_saved),
            local_time(used[i.key.id]),
            ", ".join(signer_name(s, short=True) for s in i.signers),
        )
    print_table(table)


@click.command()
@key_ref_argument
@click.option("--files", is_flag=True, help="List every file.")
@trusted_keys_option
@json_option
@global_options
def show(
    ref: str,
    files: bool,
    trusted_keys: str | None,
    as_json: bool,
    root: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Show one key: its factors, its manifests (who signed each and, with trusted keys,
    whether they trust it) and its files: what a load would restore (with trusted keys,
    from the manifests they trust only).

    ID: the key id or an unambiguous id prefix (from `ls`).
    """
    from casstore.manifest import merge
    from casstore.signing import signer_name, trusted_keys_from

    apply_globals(root, threads, verbose)
    with errors():
        store = open_store(create=False)
        trust = trusted_keys_from(trusted_keys)
        key = store.resolve(ref)
        loaded = store.manifests(key)

    def trusted(signer: bytes | None) -> bool | None:
        return None if trust is None else trust.trusts(signer)

    view = merge(s.manifest for s in loaded if trusted(s.signer) is not False)

    if as_json:
        emit_json(
            {
                "key_id": key.id,
                "key": key,
                "manifests": [
                    {
                        "name": s.name,
                        "created_at": iso_time(s.manifest.created_at),
                        "producer": s.manifest.producer,
                        "files": len(s.manifest.files),
                        "signer": None if s.signer is None else signer_name(s.signer),
                        "trusted": trusted(s.signer),
                    }
                    for s in loaded
                ],
                "files": [
                    {
                        "path": f.path,
                        "size": f.size,
                        "mode": f.mode,
                        "digest": f.digest.hex(),
                        "chunks": len(f.chunks),
                    }
                    for f in view.values()
                ],
            }
        )
        return
    echo(f"key {key.id}")
    for name, value in [
        ("torch", key.torch),
        ("arch", key.arch),
        ("model", key.model),
        *sorted(key.extra.items()),
    ]:
        echo(f"  {name:8} {value}")
    echo(f"{len(view)} files, {mib(sum(f.size for f in view.values()))}, {len(loaded)} manifests:")
    for s in loaded:
        m = s.manifest
        p = m.producer
        verdict = {None: "", True: ", trusted", False: ", NOT trusted"}[trusted(s.signer)]
        echo(
            f"  {s.name.rsplit('/', 1)[-1]}  {local_time(m.created_at)}  {len(m.files)} files  "
            f"from {p.host} (casstore {p.casstore}, python {p.python})  "
            f"{signer_name(s.signer)}{verdict}"
        )
    if files:
        for f in view.values():
            echo(f"  {f.mode:04o} {f.size:>12} {f.path}")


@click.command()
@click.option("--repair", is_flag=True, help="Move damaged objects into quarantine/.")
@trusted_keys_option
@json_option
@global_options
def verify(
    repair: bool,
    trusted_keys: str | None,
    as_json: bool,
    root: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Re-hash every chunk and check every manifest; exit 4 if anything is damaged.

    A manifest whose signature does not verify is damaged (forged or altered). With
    trusted keys (--trusted-keys, $CASSTORE_TRUSTED_KEYS), valid manifests they do not
    trust are listed too (not damage: loads ignore them).

    With --repair, a damaged pack's intact chunks are packed again and the pack is moved
    to quarantine/, with damaged indexes and manifests; the next save that holds a lost
    chunk's bytes uploads it again.
    """
    from casstore import audit

    apply_globals(root, threads, verbose)
    with errors():
        store = open_store(create=False, trusted_keys=trusted_keys, trust=True)
        with progress("verifying", not as_json) as on_progress:
            report = audit.verify(
                store, threads=store.threads, progress=on_progress, trusted=store.trusted
            )
        repaired = audit.repair(store, report) if repair else None
    if as_json:
        emit_json(
            {
                **dataclasses.asdict(report),
                "ok": report.ok,
                "repaired": dataclasses.asdict(repaired) if repaired else None,
            }
        )
    else:
        echo(
            f"{report.chunks} chunks in {report.packs} packs, {report.manifests} manifests checked"
        )
        for key, why in report.corrupt:
            echo(f"  damaged {key}: {why}")
        for key, why in report.unreadable:
            echo(f"  could not read {key} (not checked): {why}")
        for key, why in report.unsupported_indexes:
            echo(f"  kept, from a newer casstore (upgrade to check it): {key}: {why}")
        for pack_id in report.unindexed_packs:
            echo(f"  pack without an index (a save that crashed; gc removes it): {pack_id}")
        for key, why in report.invalid_manifests:
            echo(f"  invalid manifest {key}: {why}")
        for key, why in report.unsupported_manifests:
            echo(f"  kept, from a newer casstore (upgrade to check it): {key}: {why}")
        for name, digest in report.missing_chunks:
            echo(f"  {name} references missing chunk {digest}")
        for signer, count in sorted(report.signers.items()):
            echo(f"  {count} manifests {'' if signer == 'unsigned' else 'signed by '}{signer}")
        for name, signer in report.untrusted_manifests:
            echo(f"  not trusted ({signer}): {name}")
        echo("ok" if report.ok else paint("damaged", "red"))
        if repaired is not None:
            echo(
                f"quarantined {repaired.packs_quarantined} packs (their "
                f"{repaired.chunks_salvaged} intact chunks packed again), "
                f"{repaired.indexes_quarantined} indexes and "
                f"{repaired.manifests_quarantined} manifests"
            )
    if not report.ok:
        exit_with(EXIT_INCOMPLETE)


@click.command()
@click.option("--by", metavar="model", help="Break usage down: 'model'.")
@click.option(
    "--since",
    metavar="DURATION",
    default="7d",
    help="Window of the load and save figures (7d, 12h, 30d).",
)
@click.option(
    "--prometheus",
    is_flag=True,
    help="Print the figures in Prometheus' text format (for node_exporter's textfile collector).",
)
@json_option
@global_options
def stats(
    by: str | None,
    since: str,
    prometheus: bool,
    as_json: bool,
    root: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Chunks, stored bytes, logical bytes, dedup ratio, and loads and saves over a window:
    restores complete, partial and missed, bytes served (--by model: who uses the space)."""
    from casstore import audit, usage

    apply_globals(root, threads, verbose)
    if by is not None:
        if by != "model":
            usage_error(f"--by accepts 'model', not {by!r}")
        _usage(as_json)
        return
    window = parse_duration(since, "--since")
    with errors():
        store = open_store(create=False)
        s = audit.stats(store)
        start = time.time() - window
        summary = usage.summarize(usage.read(store.backend, since=start), start)
    if prometheus:
        from casstore.prometheus import exposition

        # Written as it is: no console may rewrite a byte of the exposition format.
        sys.stdout.write(exposition(str(store.root), s, summary, since.strip()))
        return
    if as_json:
        emit_json(
            {
                **dataclasses.asdict(s),
                "dedup_ratio": s.dedup_ratio,
                "compression_ratio": s.compression_ratio,
                "usage": {
                    "since": iso_time(start),
                    "loads": summary.loads,
                    "restores": summary.restores,
                    "hit_rate": summary.hit_rate,
                    "files_restored": summary.files_restored,
                    "bytes_served": summary.bytes_served,
                    "saves": summary.saves,
                    "bytes_saved": summary.bytes_saved,
                    "models": summary.models,
                },
            }
        )
        return
    echo(f"keys           {s.keys} ({s.manifests} manifests)")
    echo(f"chunks         {s.chunks} in {s.packs} packs")
    echo(f"stored         {mib(s.stored_bytes)} (compressed packs and their indexes)")
    echo(f"unique         {mib(s.unique_bytes)} (distinct chunk bytes)")
    echo(f"logical        {mib(s.logical_bytes)} (what loads write)")
    echo(f"dedup ratio    {s.dedup_ratio:.2f}x   compression {s.compression_ratio:.2f}x")
    loads = summary.loads
    rate = f", hit rate {summary.hit_rate:.0%}" if summary.hit_rate is not None else ""
    echo(f"since {local_time(start)} ({duration_text(window)}):")
    echo(
        f"  loads        {summary.restores}: {loads[usage.LOAD_COMPLETE]} complete, "
        f"{loads[usage.LOAD_PARTIAL]} partial, {loads[usage.LOAD_MISS]} missed{rate}"
    )
    echo(f"  served       {mib(summary.bytes_served)} in {summary.files_restored} files")
    echo(
        f"  saves        {sum(summary.saves.values())}: {summary.saves[usage.SAVE_SAVED]} "
        f"saved, {summary.saves[usage.SAVE_UNCHANGED]} unchanged; "
        f"{mib(summary.bytes_saved)} new"
    )


@click.command()
@json_option
@global_options
def du(as_json: bool, root: str | None, threads: int | None, verbose: bool) -> None:
    """Space used per model: bytes only it uses, bytes it shares (same as stats --by model)."""
    apply_globals(root, threads, verbose)
    _usage(as_json)


def _usage(as_json: bool) -> None:
    from casstore import audit

    with errors():
        rows = audit.usage_by_model(open_store(create=False))
    if as_json:
        emit_json([dataclasses.asdict(r) for r in rows])
        return
    from rich.table import Table

    table = Table("model", "keys", "logical", "own (stored)", "shared (stored)")
    for r in rows:
        table.add_row(
            r.model, str(r.keys), mib(r.logical_bytes), mib(r.own_bytes), mib(r.shared_bytes)
        )
    print_table(table)
