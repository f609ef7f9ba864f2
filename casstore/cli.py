"""The ``casstore`` command line. The only module that imports typer and rich.

Exit codes: 0 success; 1 error (one line on stderr); 2 usage error (a store root that is a
URL among them); 3 key not found; 4 incomplete (a load with missing files, a verify that
found damage).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from casstore import audit, config
from casstore import gc as gc_mod
from casstore.errors import CasstoreError, NotFound, UnsupportedRoot
from casstore.keys import CacheKey, detect_key, model_label
from casstore.store import Store

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_INCOMPLETE = 4

app = typer.Typer(
    name="casstore",
    help="Content-addressed store for torch.compile caches on a shared volume.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Off a terminal, rich would wrap tables at 80 columns; scripts want whole lines.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


@dataclasses.dataclass
class _State:
    root: Path | None = None
    threads: int = 16


_state = _State()

# A string, not a Path: a URL root must be rejected before Path() collapses its "//".
RootOpt = Annotated[
    str | None,
    typer.Option(
        "--root",
        envvar="CASSTORE_ROOT",
        help="Store root (default: /cache/org/cas if /cache/org exists, else ~/.cache/casstore).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
TorchOpt = Annotated[
    str | None, typer.Option(help="torch version of the key (default: the installed one).")
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        help="Accelerator arch of the key: sm_XY or a CPU ISA label (default: this host)."
    ),
]
ModelOpt = Annotated[str, typer.Option(envvar="CASSTORE_MODEL", help="Model fingerprint.")]
TreeOpt = Annotated[
    str,
    typer.Option(
        help="Tree name, a key factor: 'inductor' (the default) matches the keys "
        "load_compile_cache()/save_compile_cache() use for the inductor cache dir."
    ),
]
ExtraOpt = Annotated[
    list[str] | None,
    typer.Option("--extra", help="Extra key factor NAME=VALUE (repeatable)."),
]


@app.callback()
def _main(
    root: RootOpt = None,
    threads: Annotated[int, typer.Option(min=1, max=256, help="I/O threads.")] = 16,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="casstore: %(message)s",
        stream=sys.stderr,
    )
    try:
        _state.root = config.root_path(root) if root is not None else None
    except UnsupportedRoot as e:
        _fail(str(e), EXIT_USAGE)
    _state.threads = threads


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn library errors into one clear line and an exit code."""
    try:
        yield
    except NotFound as e:
        _fail(str(e), EXIT_NOT_FOUND)
    except UnsupportedRoot as e:  # $B10FS_CACHE_DIR: a usage error like --root
        _fail(str(e), EXIT_USAGE)
    except CasstoreError as e:
        _fail(str(e))
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}")


def _open_store(create: bool = True) -> Store:
    root = _state.root or config.default_root()
    return Store(root, threads=_state.threads, create=create)


def _key(
    torch: str | None, arch: str | None, model: str, tree: str, extra: list[str] | None
) -> CacheKey:
    extras: dict[str, str] = {"tree": tree}
    model = model_label(model)  # the same label model.py and the sidecar use for this name
    for item in extra or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _fail(f"--extra expects NAME=VALUE, got {item!r}", 2)
        extras[name] = value
    if torch is not None and arch is not None:
        return CacheKey(torch=torch, arch=arch, model=model, extra=extras)
    detected = detect_key(model, extras, import_torch=arch is None)
    return CacheKey(
        torch=torch or detected.torch,
        arch=arch or detected.arch,
        model=model,
        extra=detected.extra,
    )


@contextmanager
def _progress(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _emit_json(doc: Any) -> None:
    out.print_json(json.dumps(msgspec.to_builtins(doc)), highlight=False)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@app.command()
def save(
    directory: Annotated[Path, typer.Argument(help="Directory to save.")],
    torch: TorchOpt = None,
    arch: ArchOpt = None,
    model: ModelOpt = "default",
    tree: TreeOpt = "inductor",
    extra: ExtraOpt = None,
    max_size_mb: Annotated[
        int | None, typer.Option(help="Refuse trees larger than this many MiB.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Save DIRECTORY under a key; only chunks the store lacks are uploaded."""
    with _errors():
        key = _key(torch, arch, model, tree, extra)  # first: a key error creates no store
        store = _open_store()
        with _progress("saving", not as_json) as progress:
            report = store.save(
                directory,
                key,
                max_bytes=max_size_mb * 2**20 if max_size_mb is not None else None,
                progress=progress,
            )
    if as_json:
        _emit_json({**dataclasses.asdict(report), "key": report.key, "key_id": report.key.id})
        return
    out.print(f"saved {key}")
    out.print(
        f"  {report.files} files ({_mib(report.bytes)}), {report.changed_files} new or changed, "
        f"{report.new_chunks} new chunks ({_mib(report.new_bytes)}, "
        f"{_mib(report.stored_bytes)} compressed) in {report.seconds:.2f}s"
    )
    if report.skipped:
        out.print(
            f"  skipped {len(report.skipped)}: "
            + ", ".join(f"{p} ({why})" for p, why in report.skipped[:5])
            + (" …" if len(report.skipped) > 5 else "")
        )


@app.command()
def load(
    directory: Annotated[Path, typer.Argument(help="Directory to restore into.")],
    torch: TorchOpt = None,
    arch: ArchOpt = None,
    model: ModelOpt = "default",
    tree: TreeOpt = "inductor",
    extra: ExtraOpt = None,
    key_id: Annotated[
        str | None, typer.Option("--key", help="Key id (or prefix) instead of the key fields.")
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            help="Refuse keys larger than this (e.g. 10G), before writing anything. "
            "Default: no cap."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a saved key into DIRECTORY, fetching only files not already present."""
    try:
        max_bytes = config.parse_size(max_size) if max_size is not None else None
    except ValueError as e:
        _fail(f"--max-size: {e}", EXIT_USAGE)
    with _errors():
        store = _open_store(create=False)
        key = store.resolve(key_id) if key_id else _key(torch, arch, model, tree, extra)
        with _progress("loading", not as_json) as progress:
            report = store.load(key, directory, max_bytes=max_bytes, progress=progress)
    if as_json:
        _emit_json({**dataclasses.asdict(report), "key": report.key, "key_id": report.key.id})
    else:
        out.print(f"loaded {key}")
        out.print(
            f"  {report.written} written, {report.skipped} already present, "
            f"{len(report.missing)} missing; fetched {_mib(report.bytes_fetched)} "
            f"in {report.seconds:.2f}s"
        )
    if report.missing:  # the load logged a warning naming them
        raise typer.Exit(EXIT_INCOMPLETE)


@app.command("ls")
def list_keys(as_json: JsonOpt = False) -> None:
    """List the saved keys."""
    with _errors():
        infos = list(_open_store(create=False).keys())
    if as_json:
        _emit_json([{**dataclasses.asdict(i), "key": i.key, "id": i.key.id} for i in infos])
        return
    table = Table("id", "torch", "arch", "model", "files", "size", "saves", "last saved")
    for i in infos:
        table.add_row(
            i.key.id[:12],
            i.key.torch,
            i.key.arch,
            i.key.model,
            str(i.files),
            _mib(i.bytes),
            str(i.manifests),
            _when(i.last_saved),
        )
    out.print(table)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="Key id or unambiguous id prefix.")],
    files: Annotated[bool, typer.Option("--files", help="List every file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show one key: its factors, manifests and files."""
    with _errors():
        store = _open_store(create=False)
        key = store.resolve(ref)
        loaded = store.manifests(key)
        view = store.files(key)
    if as_json:
        _emit_json(
            {
                "key": key,
                "id": key.id,
                "manifests": [
                    {
                        "name": n,
                        "created_at": m.created_at,
                        "producer": m.producer,
                        "files": len(m.files),
                    }
                    for n, m in loaded
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
    out.print(f"key {key.id}")
    for name, value in [
        ("torch", key.torch),
        ("arch", key.arch),
        ("model", key.model),
        *sorted(key.extra.items()),
    ]:
        out.print(f"  {name:8} {value}")
    out.print(
        f"{len(view)} files, {_mib(sum(f.size for f in view.values()))}, {len(loaded)} manifests:"
    )
    for name, m in loaded:
        p = m.producer
        out.print(
            f"  {name.rsplit('/', 1)[-1]}  {_when(m.created_at)}  {len(m.files)} files  "
            f"from {p.host} (casstore {p.casstore}, python {p.python})",
            highlight=False,
        )
    if files:
        for f in view.values():
            out.print(f"  {f.mode:04o} {f.size:>12} {f.path}", highlight=False)


@app.command()
def verify(
    repair: Annotated[
        bool, typer.Option("--repair", help="Move damaged objects into quarantine/.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every chunk and check every manifest; exit 4 if anything is damaged.

    With --repair, damaged chunks and manifests are moved to quarantine/; the next save
    that holds a quarantined chunk's bytes uploads it again.
    """
    with _errors():
        store = _open_store(create=False)
        with _progress("verifying", not as_json) as progress:
            report = audit.verify(store, threads=_state.threads, progress=progress)
        repaired = audit.repair(store, report) if repair else None
    if as_json:
        _emit_json(
            {
                **dataclasses.asdict(report),
                "ok": report.ok,
                "repaired": dataclasses.asdict(repaired) if repaired else None,
            }
        )
    else:
        out.print(f"{report.chunks} chunks, {report.manifests} manifests checked")
        for key, why in report.corrupt:
            out.print(f"  corrupt chunk {key}: {why}", highlight=False)
        for key, why in report.invalid_manifests:
            out.print(f"  invalid manifest {key}: {why}", highlight=False)
        for name, digest in report.missing_chunks:
            out.print(f"  {name} references missing chunk {digest}", highlight=False)
        out.print("ok" if report.ok else "[red]damaged[/red]")
        if repaired is not None:
            out.print(
                f"quarantined {repaired.chunks_quarantined} chunks and "
                f"{repaired.manifests_quarantined} manifests"
            )
    if not report.ok:
        raise typer.Exit(EXIT_INCOMPLETE)


ByOpt = Annotated[str | None, typer.Option("--by", help="Break usage down: 'model'.")]


@app.command()
def stats(by: ByOpt = None, as_json: JsonOpt = False) -> None:
    """Chunks, stored bytes, logical bytes and the dedup ratio (--by model: who uses it)."""
    if by is not None:
        if by != "model":
            _fail(f"--by accepts 'model', not {by!r}", 2)
        _usage(as_json)
        return
    with _errors():
        s = audit.stats(_open_store(create=False))
    if as_json:
        _emit_json(
            {
                **dataclasses.asdict(s),
                "dedup_ratio": s.dedup_ratio,
                "compression_ratio": s.compression_ratio,
            }
        )
        return
    out.print(f"keys           {s.keys} ({s.manifests} manifests)")
    out.print(f"chunks         {s.chunks}")
    out.print(f"stored         {_mib(s.stored_bytes)} (compressed)")
    out.print(f"unique         {_mib(s.unique_bytes)} (distinct chunk bytes)")
    out.print(f"logical        {_mib(s.logical_bytes)} (what loads write)")
    out.print(f"dedup ratio    {s.dedup_ratio:.2f}x   compression {s.compression_ratio:.2f}x")


@app.command()
def du(as_json: JsonOpt = False) -> None:
    """Space used per model: bytes only it uses, bytes it shares (same as stats --by model)."""
    _usage(as_json)


def _usage(as_json: bool) -> None:
    with _errors():
        rows = audit.usage_by_model(_open_store(create=False))
    if as_json:
        _emit_json([dataclasses.asdict(r) for r in rows])
        return
    table = Table("model", "keys", "logical", "own (stored)", "shared (stored)")
    for r in rows:
        table.add_row(
            r.model, str(r.keys), _mib(r.logical_bytes), _mib(r.own_bytes), _mib(r.shared_bytes)
        )
    out.print(table)


@app.command()
def rm(
    ref: Annotated[str, typer.Argument(help="Key id or unambiguous id prefix.")],
    as_json: JsonOpt = False,
) -> None:
    """Delete a key's manifests; its chunks are freed by the next gc (after the grace)."""
    with _errors():
        store = _open_store(create=False)
        key = store.resolve(ref)
        count = gc_mod.remove_key(store, key)
    if as_json:
        _emit_json({"key": key, "id": key.id, "manifests_deleted": count})
    else:
        out.print(f"removed {key} ({count} manifests)")


def _duration(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return config.parse_duration(text)
    except ValueError as e:
        _fail(str(e), 2)


@app.command()
def gc(
    max_age: Annotated[
        str | None,
        typer.Option(
            envvar="CASSTORE_GC_MAX_AGE",
            help="Drop keys neither saved nor loaded for this long (e.g. 30d).",
        ),
    ] = None,
    max_size: Annotated[
        str | None,
        typer.Option(
            envvar="CASSTORE_GC_MAX_SIZE",
            help="Drop least-recently-used keys until the stored chunks fit (e.g. 500G).",
        ),
    ] = None,
    keep_last: Annotated[
        int | None,
        typer.Option(
            envvar="CASSTORE_GC_KEEP_LAST",
            min=1,
            help="Per model (and tree): keep the N most recently used keys.",
        ),
    ] = None,
    grace: Annotated[
        str,
        typer.Option(
            envvar="CASSTORE_GC_GRACE",
            help="Never delete a chunk younger than this; must exceed the slowest save.",
        ),
    ] = "1h",
    compact: Annotated[bool, typer.Option(help="Merge each key's manifests into one.")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Apply retention, compact manifests, and delete unreferenced chunks past the grace."""
    grace_s = _duration(grace)
    assert grace_s is not None
    try:
        size = config.parse_size(max_size) if max_size is not None else None
    except ValueError as e:
        _fail(str(e), 2)
    settings = config.read_settings()
    policy = gc_mod.Policy(
        max_age=_duration(max_age),
        max_size=size,
        keep_last=keep_last,
        grace=grace_s,
        compact=compact,
        temp_timeout=settings.incomplete_timeout_seconds,
        lock_timeout=settings.lock_timeout_seconds,
    )
    with _errors():
        store = _open_store(create=False)
        with gc_mod.gc_lock(store) as held:
            if not held:
                err.print("another gc is running on this store; nothing done")
                return
            plan = gc_mod.plan(store, policy)
            summary = plan.summary()
            if not as_json:
                _print_plan(plan)
            if dry_run:
                if as_json:
                    _emit_json({"plan": summary, "executed": False})
                return
            if (
                not yes
                and sys.stdin.isatty()
                and not as_json
                and (plan.drop or plan.chunks)
                and not typer.confirm("go ahead?", err=True)
            ):
                raise typer.Exit(1)
            with _progress("sweeping", not as_json) as progress:
                report = gc_mod.execute(store, plan, threads=_state.threads, progress=progress)
    if as_json:
        _emit_json({"plan": summary, "executed": True, "report": dataclasses.asdict(report)})
        return
    out.print(
        f"dropped {report.keys_dropped} keys ({report.manifests_deleted} manifests)"
        + (f", kept {report.keys_spared} used since planning" if report.keys_spared else "")
        + f", compacted "
        f"{report.keys_compacted}, deleted {report.chunks_deleted} chunks "
        f"({_mib(report.bytes_freed)}), spared {report.chunks_kept_late} in use, removed "
        f"{report.temps_removed} temp and {report.locks_removed} lock files in "
        f"{report.seconds:.2f}s"
    )
    for problem in report.errors:
        err.print(f"[yellow]warning:[/yellow] {problem}", highlight=False)


def _print_plan(plan: gc_mod.Plan) -> None:
    out.print(f"{len(plan.keys)} keys; live: {plan.live_chunks} chunks ({_mib(plan.live_bytes)})")
    for d in plan.drop:
        out.print(
            f"  drop {d.state.key_id[:12]} ({d.state.key.describe()}): {d.reason}", highlight=False
        )
    if plan.compact:
        out.print(f"  compact {len(plan.compact)} keys with several manifests")
    out.print(
        f"  delete {len(plan.chunks)} unreferenced chunks older than "
        f"{plan.policy.grace:.0f}s ({_mib(plan.freed_bytes)})"
    )
    out.print(f"  remove {len(plan.temps)} stale temp files, {len(plan.locks)} stale lock files")


vllm_app = typer.Typer(
    help="Sidecar for vLLM: restore its compile cache, save it once compiled (docs/vllm.md).",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(vllm_app, name="vllm")

CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", help="vLLM cache root (default: $VLLM_CACHE_ROOT or ~/.cache/vllm)."
    ),
]
UrlOpt = Annotated[str, typer.Option(help="Readiness URL: saving waits for HTTP 200 here.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for readiness.")]
QuietOpt = Annotated[float, typer.Option(help="Seconds without a cache change before saving.")]
PollOpt = Annotated[float, typer.Option(help="Seconds between checks.")]
PidOpt = Annotated[
    int | None,
    typer.Option(
        help="Exit (after a final save) when this process "
        "exits, e.g. the shell pid that execs vllm."
    ),
]
VllmModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Model fingerprint (default: $CASSTORE_MODEL or 'default')."),
]


def _sidecar(
    cache_dir: Path | None,
    url: str,
    timeout: float,
    quiet: float,
    poll: float,
    pid: int | None,
    model: str | None,
) -> Any:
    import signal

    from casstore import vllm

    sidecar = vllm.Sidecar(
        vllm.SidecarOptions(
            cache_root=cache_dir or vllm.default_cache_root(),
            url=url,
            timeout=timeout,
            quiet=quiet,
            poll=poll,
            pid=pid,
            model=model,
            root=_state.root,
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.stop())
    return sidecar


@vllm_app.callback()
def vllm_main(
    ctx: typer.Context,
    cache_dir: CacheDirOpt = None,
    url: UrlOpt = "http://127.0.0.1:8000/v1/models",
    timeout: TimeoutOpt = 1800.0,
    quiet: QuietOpt = 30.0,
    poll: PollOpt = 2.0,
    pid: PidOpt = None,
    model: VllmModelOpt = None,
) -> None:
    """Restore, then watch and save (the background form: `casstore vllm & vllm serve`)."""
    if ctx.invoked_subcommand is not None:
        return
    _ensure_logging()
    raise typer.Exit(_sidecar(cache_dir, url, timeout, quiet, poll, pid, model).run())


@vllm_app.command("restore")
def vllm_restore(cache_dir: CacheDirOpt = None, model: VllmModelOpt = None) -> None:
    """Restore only, then exit 0 whatever happened, so `&& vllm serve` always starts."""
    _ensure_logging()
    status = _sidecar(cache_dir, "", 0, 0, 0, None, model).restore()
    err.print(f"casstore vllm restore: {status.name}", highlight=False)


@vllm_app.command("watch")
def vllm_watch(
    cache_dir: CacheDirOpt = None,
    url: UrlOpt = "http://127.0.0.1:8000/v1/models",
    timeout: TimeoutOpt = 1800.0,
    quiet: QuietOpt = 30.0,
    poll: PollOpt = 2.0,
    pid: PidOpt = None,
    model: VllmModelOpt = None,
) -> None:
    """Watch and save only (after a blocking `casstore vllm restore`)."""
    _ensure_logging()
    raise typer.Exit(_sidecar(cache_dir, url, timeout, quiet, poll, pid, model).watch())


def _ensure_logging() -> None:
    # The sidecar runs unattended: its progress belongs in the server's log at INFO.
    logging.getLogger("casstore").setLevel(logging.INFO)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
