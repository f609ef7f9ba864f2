"""Maintenance commands: gc and rm. Neither can surprise: sizes and durations need a unit,
a grace below a safe floor needs --unsafe-grace, and rm by an id prefix shows the key and
asks first."""

from __future__ import annotations

import dataclasses

import click

from casstore import config
from casstore import gc as gc_mod
from casstore.cli.common import (
    EXIT_ERROR,
    apply_globals,
    dry_run_option,
    duration_text,
    echo,
    emit_json,
    errors,
    exit_with,
    global_options,
    json_option,
    key_ref_argument,
    mib,
    open_store,
    parse_duration,
    parse_size,
    progress,
    root_choice,
    stdin_is_terminal,
    usage_error,
    warn,
    yes_option,
)

# A grace shorter than this could let gc delete chunks a slow save has just written.
GRACE_FLOOR_SECONDS = 600.0
BUSY_MESSAGE = "another gc is running on this store; nothing done"
GC_SIGNING_KEY_VARIABLE = "CASSTORE_GC_SIGNING_KEY"
GC_TRUSTED_KEYS_VARIABLE = "CASSTORE_GC_TRUSTED_KEYS"


@click.command()
@key_ref_argument
@yes_option
@dry_run_option
@json_option
@global_options
def rm(
    ref: str,
    yes: bool,
    dry_run: bool,
    as_json: bool,
    root: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Delete a key's manifests; its chunks are freed by the next gc (after the grace).

    ID: the key id or an unambiguous id prefix (from `ls`).

    Shows the key first. Given an id prefix rather than the full id, it asks (-y does not);
    off a terminal, a prefix needs -y.
    """
    apply_globals(root, threads, verbose)
    with errors():
        store = open_store(create=False)
        key = store.resolve(ref)
        manifests = len(store.manifests(key))
        view = store.files(key)
    size = sum(f.size for f in view.values())
    doc: dict[str, object] = {
        "key_id": key.id,
        "key": key,
        "manifests": manifests,
        "files": len(view),
        "bytes": size,
    }
    what = f"{key.id} ({key.describe()}): {manifests} manifests, {len(view)} files, {mib(size)}"
    if dry_run:
        if as_json:
            emit_json({**doc, "deleted": False, "manifests_deleted": 0})
        else:
            echo(f"would remove {what}")
        return
    if not yes and ref.strip().lower() != key.id:
        if not stdin_is_terminal():
            usage_error(
                f"{ref!r} is a prefix of key {key.id} ({key.describe()}); to delete it, "
                "give the full id or -y"
            )
        echo(f"remove {what}", err=True)
        if not click.confirm("delete it?", err=True):
            exit_with(EXIT_ERROR)
    with errors():
        count = gc_mod.remove_key(store, key)
    if as_json:
        emit_json({**doc, "deleted": True, "manifests_deleted": count})
    else:
        echo(f"removed {what}")


@click.command()
@click.option(
    "--max-age",
    envvar="CASSTORE_GC_MAX_AGE",
    show_envvar=True,
    metavar="DURATION",
    help="Drop keys neither saved nor loaded for this long (30d, 12h).",
)
@click.option(
    "--max-size",
    envvar="CASSTORE_GC_MAX_SIZE",
    show_envvar=True,
    metavar="SIZE",
    help="Drop least-recently-used keys until the stored chunks fit (500G, 2T).",
)
@click.option(
    "--keep-last",
    envvar="CASSTORE_GC_KEEP_LAST",
    show_envvar=True,
    type=click.IntRange(min=1),
    metavar="N",
    help="Per model (and tree): keep the N most recently used keys.",
)
@click.option(
    "--grace",
    envvar="CASSTORE_GC_GRACE",
    show_envvar=True,
    default="1h",
    metavar="DURATION",
    help="Never delete a chunk younger than this; must exceed the slowest save. "
    "Below 10m it needs --unsafe-grace.",
)
@click.option(
    "--unsafe-grace",
    is_flag=True,
    help="Accept a --grace below 10m: a save slower than the grace can lose chunks.",
)
@click.option("--compact/--no-compact", default=True, help="Merge each key's manifests into one.")
@click.option(
    "--usage-retention",
    envvar="CASSTORE_GC_USAGE_RETENTION",
    show_envvar=True,
    default="90d",
    metavar="DURATION",
    help="Keep load and save records (stats --since, ls) this long.",
)
@click.option(
    "--signing-key",
    envvar=GC_SIGNING_KEY_VARIABLE,
    show_envvar=True,
    metavar="PATH",
    help="Also merge the manifests this private key signed, signing the merged one with it "
    "(gc never merges other signed manifests).",
)
@click.option(
    "--trusted-keys",
    envvar=GC_TRUSTED_KEYS_VARIABLE,
    show_envvar=True,
    metavar="KEYS",
    help="Every public key any deployment trusts (ed25519:..., or a file): --keep-last and "
    "--max-size then rank keys by their newest manifest one of these signed (not by "
    "markers or other manifests, which anyone can write).",
)
@dry_run_option
@yes_option
@json_option
@global_options
def gc(
    max_age: str | None,
    max_size: str | None,
    keep_last: int | None,
    grace: str,
    unsafe_grace: bool,
    compact: bool,
    usage_retention: str,
    signing_key: str | None,
    trusted_keys: str | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
    root: str | None,
    threads: int | None,
    verbose: bool,
) -> None:
    """Apply retention, compact manifests, and delete unreferenced chunks past the grace.

    A key that retention drops is set aside (it stops loading) and deleted by the next run,
    unless a replica saves it in between. Asks before changing anything on a terminal.
    """
    apply_globals(root, threads, verbose)
    grace_s = parse_duration(grace, "--grace")
    if grace_s < GRACE_FLOOR_SECONDS and not unsafe_grace:
        usage_error(
            f"--grace {grace} is below the {duration_text(GRACE_FLOOR_SECONDS)} floor: a save "
            "that takes longer than the grace can lose chunks; add --unsafe-grace to use it"
        )
    # The timeouts only: the root is gc's own (--root), never the model.py default, whose
    # resolution warns about a local fallback store gc does not touch.
    settings = config.read_settings(root=root_choice(warn=False).path)
    policy = gc_mod.Policy(
        max_age=parse_duration(max_age, "--max-age") if max_age is not None else None,
        max_size=parse_size(max_size, "--max-size") if max_size is not None else None,
        keep_last=keep_last,
        grace=grace_s,
        compact=compact,
        usage_retention=parse_duration(usage_retention, "--usage-retention"),
        temp_timeout=settings.incomplete_timeout_seconds,
        lock_timeout=settings.lock_timeout_seconds,
    )
    with errors():
        # gc is an organisation-wide job: it reads only its own variables, never a
        # deployment's $CASSTORE_SIGNING_KEY or $CASSTORE_TRUSTED_KEYS.
        store = open_store(
            create=False,
            signing_key=signing_key,
            trusted_keys=trusted_keys,
            sign=True,
            trust=True,
            signing_variable=GC_SIGNING_KEY_VARIABLE,
            trust_variable=GC_TRUSTED_KEYS_VARIABLE,
        )
        with gc_mod.gc_lock(store) as held:
            if not held:
                if as_json:
                    emit_json({"executed": False, "busy": True, "message": BUSY_MESSAGE})
                else:
                    echo(BUSY_MESSAGE, err=True)
                return
            plan = gc_mod.plan(store, policy)
            summary = plan.summary()
            if not as_json:
                _print_plan(plan)
            if dry_run:
                if as_json:
                    emit_json({"plan": summary, "executed": False, "busy": False})
                return
            if (
                not yes
                and stdin_is_terminal()
                and not as_json
                and (plan.drop or plan.set_aside or plan.packs or plan.repack)
                and not click.confirm("go ahead?", err=True)
            ):
                exit_with(EXIT_ERROR)
            with progress("sweeping", not as_json) as on_progress:
                report = gc_mod.execute(store, plan, threads=store.threads, progress=on_progress)
    if as_json:
        emit_json(
            {
                "plan": summary,
                "executed": True,
                "busy": False,
                "report": dataclasses.asdict(report),
            }
        )
        return
    echo(
        f"set aside {report.keys_dropped} keys"
        + (f", kept {report.keys_spared} used since planning" if report.keys_spared else "")
        + f"; deleted {report.keys_expired} set aside earlier ({report.manifests_deleted} "
        f"manifests), restored {report.keys_restored}; compacted {report.keys_compacted}; "
        f"deleted {report.packs_deleted} packs ({mib(report.bytes_freed)}), repacked "
        f"{report.packs_repacked} ({report.chunks_repacked} live chunks), spared "
        f"{report.packs_kept_late} in use; removed {report.temps_removed} temp and "
        f"{report.locks_removed} lock files in {report.seconds:.2f}s"
    )
    for problem in report.errors:
        warn(problem)


def _print_plan(plan: gc_mod.Plan) -> None:
    echo(f"{len(plan.keys)} keys; live: {plan.live_chunks} chunks ({mib(plan.live_bytes)})")
    for d in plan.drop:
        echo(
            f"  set aside {d.state.key_id[:12]} ({d.state.key.describe()}): {d.reason}; "
            "it stops loading now, and the next run deletes it unless it is saved again"
        )
    for a in plan.set_aside:
        if a.restore:
            echo(f"  restore {a.key_id[:12]}: set aside by an earlier run, saved since")
        elif a.due:
            echo(f"  delete {a.key_id[:12]}: set aside by an earlier run")
        else:
            echo(
                f"  keep {a.key_id[:12]} set aside: deleted by a run at least "
                f"{duration_text(plan.policy.grace)} after it was set aside"
            )
    if plan.compact:
        echo(f"  compact {len(plan.compact)} keys with several manifests")
    for key_id, why in plan.uncompacted:
        echo(f"  leave {key_id[:12]} uncompacted: {why}")
    grace = duration_text(plan.policy.grace)
    if plan.sweep_blocked:
        echo(f"  delete no pack: {plan.sweep_blocked}")
    else:
        echo(
            f"  delete {len(plan.packs)} packs with no live chunk (or their live chunks "
            f"copied elsewhere) older than {grace} ({mib(plan.freed_bytes)})"
        )
        if plan.repack:
            echo(
                f"  repack {len(plan.repack)} mostly dead packs ({mib(plan.repack_bytes)}): "
                f"their live chunks are copied now, the packs freed by a run once the "
                f"copies are older than {grace}"
            )
        if plan.waiting:
            echo(
                f"  keep {len(plan.waiting)} mostly dead packs "
                f"({mib(plan.waiting_bytes)}) until the copies of their "
                f"live chunks, published within {grace}, are older than that"
            )
    echo(
        f"  the grace keeps {plan.grace_kept} packs with no live chunk younger than {grace} "
        f"({mib(plan.grace_kept_bytes)})"
    )
    echo(f"  remove {len(plan.temps)} stale temp files, {len(plan.locks)} stale lock files")
