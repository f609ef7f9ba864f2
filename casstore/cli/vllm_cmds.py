"""``casstore vllm``: the sidecar for vLLM (docs/vllm.md).

Its options work before the subcommand (``casstore vllm --model M restore``) and after it
(``casstore vllm restore --model M``); after wins. An option the subcommand does not take
(``--url`` for ``restore``) is refused, never dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import click

from casstore import config
from casstore.cli.common import (
    CONTEXT_SETTINGS,
    FC,
    apply_globals,
    exit_with,
    options,
    root_option,
    say,
    signing_key_option,
    trusted_keys_option,
    usage_error,
    verbose_option,
)

if TYPE_CHECKING:
    from casstore.vllm import Sidecar

cache_dir_option = click.option(
    "--cache-dir",
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="vLLM cache root (default: $VLLM_CACHE_ROOT, else ~/.cache/vllm).",
)
model_option = click.option(
    "--model", metavar="MODEL", help="Model fingerprint (default: $CASSTORE_MODEL or default)."
)
url_option = click.option(
    "--url",
    metavar="URL",
    help="Readiness URL: saving waits for HTTP 200 (or 401/403: up, behind a key) here "
    "(default: vLLM's http://127.0.0.1:8000/health).",
)
timeout_option = click.option(
    "--timeout",
    type=float,
    metavar="SECONDS",
    help="Seconds to wait for readiness (default: 1800).",
)
quiet_option = click.option(
    "--quiet",
    type=float,
    metavar="SECONDS",
    help="Seconds without a cache change before saving (default: 30).",
)
poll_option = click.option(
    "--poll", type=float, metavar="SECONDS", help="Seconds between checks (default: 2)."
)
pid_option = click.option(
    "--pid",
    type=int,
    metavar="PID",
    help="Exit (after a final save) when this process exits, e.g. the shell pid that execs vllm.",
)


def watch_options(f: FC) -> FC:
    """The options of a sidecar that restores, then saves once vLLM has compiled: those of
    the group itself and of `casstore vllm watch`."""
    for option in (
        verbose_option,
        root_option,
        trusted_keys_option,
        signing_key_option,
        model_option,
        pid_option,
        poll_option,
        quiet_option,
        timeout_option,
        url_option,
        cache_dir_option,
    ):
        f = option(f)
    return f


@dataclasses.dataclass
class SidecarArgs:
    """The sidecar's options; None: not given."""

    cache_dir: Path | None = None
    model: str | None = None
    url: str | None = None
    timeout: float | None = None
    quiet: float | None = None
    poll: float | None = None
    pid: int | None = None
    signing_key: str | None = None
    trusted_keys: str | None = None

    def merged(self, later: SidecarArgs) -> SidecarArgs:
        """These options, overridden by those given in ``later``."""
        return SidecarArgs(
            **{
                f.name: getattr(later, f.name)
                if getattr(later, f.name) is not None
                else getattr(self, f.name)
                for f in dataclasses.fields(self)
            }
        )

    def given(self) -> list[str]:
        return [
            f"--{f.name.replace('_', '-')}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        ]


def _group_args(ctx: click.Context) -> SidecarArgs:
    found = ctx.find_object(SidecarArgs)
    return found if found is not None else SidecarArgs()


def _refuse_threads() -> None:
    if options.threads is not None:
        usage_error("--threads does not apply to `casstore vllm`")


def _sidecar(args: SidecarArgs) -> Sidecar:
    from casstore import vllm

    sidecar = vllm.Sidecar(
        vllm.SidecarOptions(
            cache_root=args.cache_dir or vllm.default_cache_root(),
            url=args.url if args.url is not None else vllm.DEFAULT_URL,
            timeout=args.timeout if args.timeout is not None else 1800.0,
            quiet=args.quiet if args.quiet is not None else 30.0,
            poll=args.poll if args.poll is not None else 2.0,
            pid=args.pid,
            model=args.model,
            root=config.root_path(options.root) if options.root is not None else None,
            signing_key=args.signing_key,
            trusted_keys=args.trusted_keys,
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.stop())
    return sidecar


def _unattended_logging() -> None:
    # The sidecar runs unattended: its progress belongs in the server's log at INFO.
    logging.getLogger("casstore").setLevel(logging.INFO)


@click.group(
    "vllm",
    invoke_without_command=True,
    context_settings=CONTEXT_SETTINGS,
    help="Sidecar for vLLM: restore its compile cache, save it once compiled (docs/vllm.md).",
)
@watch_options
@click.pass_context
def vllm_group(
    ctx: click.Context,
    cache_dir: Path | None,
    url: str | None,
    timeout: float | None,
    quiet: float | None,
    poll: float | None,
    pid: int | None,
    model: str | None,
    signing_key: str | None,
    trusted_keys: str | None,
    root: str | None,
    verbose: bool,
) -> None:
    """Restore, then watch and save (the background form: `casstore vllm & vllm serve`).

    Options given here apply to the subcommand too.
    """
    apply_globals(root, None, verbose)
    _refuse_threads()
    args = SidecarArgs(cache_dir, model, url, timeout, quiet, poll, pid, signing_key, trusted_keys)
    if ctx.invoked_subcommand is not None:
        ctx.obj = args
        return
    _unattended_logging()
    exit_with(_sidecar(args).run())


@vllm_group.command("restore")
@cache_dir_option
@model_option
@trusted_keys_option
@root_option
@verbose_option
@click.pass_context
def vllm_restore(
    ctx: click.Context,
    cache_dir: Path | None,
    model: str | None,
    trusted_keys: str | None,
    root: str | None,
    verbose: bool,
) -> None:
    """Restore only, then exit 0 whatever happened (start vLLM after it with `;`, so it
    starts even where casstore cannot run)."""
    apply_globals(root, None, verbose)
    group = _group_args(ctx)
    ignored = dataclasses.replace(group, cache_dir=None, model=None, trusted_keys=None).given()
    if ignored:
        usage_error(
            f"{', '.join(ignored)} does not apply to `casstore vllm restore` "
            "(it takes --cache-dir, --model and --trusted-keys)"
        )
    args = group.merged(SidecarArgs(cache_dir=cache_dir, model=model, trusted_keys=trusted_keys))
    _unattended_logging()
    status = _sidecar(args).restore()
    say("casstore vllm restore", "", status.name)


@vllm_group.command("watch")
@watch_options
@click.pass_context
def vllm_watch(
    ctx: click.Context,
    cache_dir: Path | None,
    url: str | None,
    timeout: float | None,
    quiet: float | None,
    poll: float | None,
    pid: int | None,
    model: str | None,
    signing_key: str | None,
    trusted_keys: str | None,
    root: str | None,
    verbose: bool,
) -> None:
    """Watch and save only (after a blocking `casstore vllm restore`)."""
    apply_globals(root, None, verbose)
    args = _group_args(ctx).merged(
        SidecarArgs(cache_dir, model, url, timeout, quiet, poll, pid, signing_key, trusted_keys)
    )
    _unattended_logging()
    exit_with(_sidecar(args).watch())
