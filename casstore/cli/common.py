"""What every command shares: the lazy command group, the global options and the options
several commands take (as decorators), exit codes and error handling, value parsing, and
output.

Global options (``--root``, ``--threads``, ``-v``) are accepted before the command and
after it: each command declares them too (:func:`global_options`) and calls
:func:`apply_globals`; a value given after the command wins over one given before it.

Start-up stays light: this module imports neither the store nor rich. A command imports
what it needs when it runs (:func:`open_store` imports the store; :func:`progress` and
:func:`print_table` import rich, the first only on a terminal), and :class:`LazyGroup`
imports only the module of the command invoked.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import msgspec

from casstore import config, signing
from casstore.cli.without_extra import CLI_LIBRARIES
from casstore.cli.without_extra import main as without_extra
from casstore.errors import CasstoreError, InvalidManifest, NotFound, UnsupportedRoot

if TYPE_CHECKING:
    from rich.table import Table

    from casstore.keys import CacheKey
    from casstore.store import Store

EXIT_OK = 0
EXIT_ERROR = 1  # anything else: one line on stderr
EXIT_USAGE = 2  # a bad option value, a missing directory, a file where a directory is needed
EXIT_NOT_FOUND = 3  # no such key
EXIT_INCOMPLETE = 4  # a load with missing files, a verify that found damage

# Every command and group in this package, and the settings the root group hands down to
# them: -h as well as --help, and `[default: ...]` shown in help wherever one is set.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "show_default": True}

FC = TypeVar("FC", bound=Callable[..., Any])


class LazyGroup(click.Group):
    """A group whose commands are named ``"module:attribute"`` and imported only when one
    is invoked (``--help`` imports them all, to list their help): a command pays for its
    own imports, never for those of the others."""

    def __init__(
        self, *args: Any, lazy_commands: Mapping[str, str] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})  # in the order help lists them

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy_commands, *super().list_commands(ctx)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_commands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
        return command


@dataclasses.dataclass
class GlobalOptions:
    """The global options given so far (None: not given)."""

    root: str | None = None
    threads: int | None = None
    verbose: bool = False


options = GlobalOptions()


# --- output ---------------------------------------------------------------------------------


def echo(text: str = "", *, err: bool = False) -> None:
    """One line on stdout (stderr with ``err``), printed as it is: what is printed includes
    text anyone who can write the store chose (a manifest's producer host, object names),
    so nothing in it is read as markup or emoji codes ("[conceal]", ":a:" print as they
    are), and nothing is stripped either."""
    click.echo(text, err=err, color=True)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def paint(text: str, color: str, *, err: bool = False) -> str:
    """``text`` in ``color`` where it goes to a terminal (and $NO_COLOR is not set);
    elsewhere as it is."""
    stream = sys.stderr if err else sys.stdout
    if not color or not _is_terminal(stream) or os.environ.get("NO_COLOR", ""):
        return text
    return click.style(text, fg=color)


def emit_json(doc: Any) -> None:
    """``doc`` as indented JSON on stdout; text other than ASCII as it is."""
    echo(json.dumps(msgspec.to_builtins(doc), indent=2, ensure_ascii=False))


def print_table(table: Table) -> None:
    """A rich table on stdout. Off a terminal, rich would wrap it at 80 columns; scripts
    want whole lines. markup=False: cells hold text anyone who can write the store chose;
    rich markup in it must print as it is, never restyle or hide what follows. emoji=False:
    ":a:" in a model label (org:a:v1) is text, not an emoji code."""
    from rich.console import Console

    Console(
        soft_wrap=True,
        width=None if _is_terminal(sys.stdout) else 1000,
        highlight=False,
        markup=False,
        emoji=False,
    ).print(table)


# --- errors ---------------------------------------------------------------------------------


def say(label: str, color: str, message: str) -> None:
    """``label: message`` as one line on stderr, the label in ``color`` on a terminal."""
    echo(f"{paint(f'{label}:', color, err=True)} {' '.join(message.split())}", err=True)


def exit_with(code: int) -> NoReturn:
    """End the command with exit status ``code`` (main() exits with it)."""
    raise click.exceptions.Exit(code)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    say("error", "red", message)
    exit_with(code)


def usage_error(message: str) -> NoReturn:
    fail(message, EXIT_USAGE)


def warn(message: str) -> None:
    say("warning", "yellow", message)


@contextmanager
def errors() -> Iterator[None]:
    """Turn library errors into one clear line and an exit code."""
    try:
        yield
    except NotFound as e:
        fail(str(e), EXIT_NOT_FOUND)
    except UnsupportedRoot as e:  # a URL from $CASSTORE_ROOT/$B10FS_CACHE_DIR, like --root
        fail(str(e), EXIT_USAGE)
    except CasstoreError as e:
        fail(str(e))
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        fail(f"{e.strerror or e}{where}")


def run(group: click.Group) -> NoReturn:
    """Run ``group`` as the ``casstore`` command; usage errors are one line too, and exit 2;
    any other error is one line, with its traceback under -v."""
    try:
        code = group.main(prog_name="casstore", standalone_mode=False)
    except click.exceptions.Exit as e:
        finish(e.exit_code)
    except click.ClickException as e:  # usage errors (exit 2) and the like
        say("error", "red", e.format_message())
        finish(e.exit_code)
    except click.exceptions.Abort:  # Ctrl-C or end of input at a prompt
        say("error", "red", "aborted")
        finish(EXIT_ERROR)
    except Exception as e:  # a bug: still one line, the traceback with -v
        if isinstance(e, ModuleNotFoundError) and _top_name(e.name) in CLI_LIBRARIES:
            without_extra()  # rich, imported by the commands that draw tables and bars
        if options.verbose:
            import traceback

            traceback.print_exc()
        say("error", "red", f"unexpected {type(e).__name__}: {e} (-v shows the traceback)")
        finish(EXIT_ERROR)
    finish(code if isinstance(code, int) else EXIT_OK)


def finish(code: int) -> NoReturn:
    """Exit with ``code`` once the command is done, without the interpreter's teardown.

    When a command returns, its work is over: casstore starts no thread that outlives
    it, and every file, lock and pool it opened was closed by its context managers. What
    is left is finalizing every module and the object-store client's runtime: 30-50 ms
    of a 0.3 s command (an unchanged re-save), paid by every call from a startup script.
    Output is flushed and logging shut down first, as a normal exit does: output that
    cannot be written (a full disk) fails the command, as it would then; a reader gone
    early (``casstore ls | head``) does not. Under a profiler, a coverage tool or a
    debugger (they write their results at exit), it exits the usual way."""
    if _observed():
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed
            continue
        try:
            stream.flush()
        except BrokenPipeError:
            pass
        except (OSError, ValueError) as e:
            if stream is sys.stdout and code == EXIT_OK:
                code = EXIT_ERROR
                try:
                    say("error", "red", f"could not write the output: {e}")
                except (OSError, ValueError):
                    pass
    os._exit(code)


def _observed() -> bool:
    """Whether a profiler, tracer or monitoring tool (coverage, debuggers; Python 3.12's
    sys.monitoring) watches this process."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(
        monitoring.get_tool(tool) is not None for tool in range(6)
    )


def _top_name(module: str | None) -> str:
    return (module or "").partition(".")[0]


# --- option decorators ----------------------------------------------------------------------


def _options(*decorators: Callable[[Any], Any]) -> Callable[[FC], FC]:
    """One decorator applying ``decorators``; help lists their options in this order."""

    def apply(f: FC) -> FC:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


# Strings, not Paths: a URL root must be refused before Path() collapses its "//".
root_option = click.option(
    "--root",
    metavar="PATH",
    help="Store root (default: $CASSTORE_ROOT, else the scope's volume such as "
    "/cache/org/cas when mounted, else ~/.cache/casstore; `casstore doctor` tells).",
)
threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1, max=256),
    metavar="N",
    help="I/O threads (a restore uses at most 1 per core, 2 from s3://). Default: "
    "$CASSTORE_THREADS, else 4 per core (at most 32).",
)
verbose_option = click.option("--verbose", "-v", is_flag=True, help="Log details on stderr.")
#: --root, --threads, -v: each command takes them after its name too (``apply_globals``).
global_options = _options(root_option, threads_option, verbose_option)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from casstore import __version__

        click.echo(f"casstore {__version__}")
        ctx.exit()


version_option = click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the version and exit.",
)

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout."
)
yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Show what would be done; change nothing."
)
#: --torch, --arch, --model, --tree, --extra: the key of save and load (:func:`build_key`).
key_options = _options(
    click.option(
        "--torch", metavar="VERSION", help="torch version of the key (default: the installed one)."
    ),
    click.option(
        "--arch",
        metavar="ARCH",
        help="Accelerator arch of the key: sm_XY or a CPU ISA label (default: this host).",
    ),
    click.option(
        "--model",
        metavar="MODEL",
        default="default",
        envvar="CASSTORE_MODEL",
        show_envvar=True,
        help="Model fingerprint.",
    ),
    click.option(
        "--tree",
        metavar="TREE",
        default="inductor",
        help="Tree name, a key factor: 'inductor' (the default) gives the key of "
        "load_compile_cache()/save_compile_cache(), 'vllm' that of `casstore vllm`.",
    ),
    click.option(
        "--extra", metavar="NAME=VALUE", multiple=True, help="Extra key factor (repeatable)."
    ),
)
signing_key_option = click.option(
    "--signing-key",
    metavar="PATH",
    help="Sign the manifests published with this private key (`casstore keygen`). "
    "Default: $CASSTORE_SIGNING_KEY.",
)
trusted_keys_option = click.option(
    "--trusted-keys",
    metavar="KEYS",
    help="Use only manifests signed by these public keys: ed25519:... separated by "
    "commas, or a file with one per line. Default: $CASSTORE_TRUSTED_KEYS; unset: "
    "every manifest, signed or not.",
)
#: ID: a key id or an unambiguous prefix of one (click shows no help for arguments: the
#: commands' help says so).
key_ref_argument = click.argument("ref", metavar="ID")


# --- global options -------------------------------------------------------------------------


def apply_globals(root: str | None, threads: int | None, verbose: bool) -> None:
    """Record the global options given at this level (before or after the command)."""
    if root is not None:
        try:
            config.check_root(root)
        except UnsupportedRoot as e:
            usage_error(str(e))
        options.root = root
    if threads is not None:
        options.threads = threads
    if verbose:
        options.verbose = True
        logging.getLogger("casstore").setLevel(logging.INFO)


def root_choice(*, warn: bool = True) -> config.RootChoice:
    """The store root these options and the environment choose, and where it came from
    (``warn=False``: the local fallback is not logged)."""
    try:
        return config.choose_root(options.root, warn=warn)
    except UnsupportedRoot as e:
        usage_error(str(e))


def io_threads() -> int | None:
    """--threads, else $CASSTORE_THREADS (as the model.py calls read it); None: the
    store's default (4 x cores, at most 32; 32 for an object store)."""
    return options.threads if options.threads is not None else config.threads()


def open_store(
    create: bool = True,
    *,
    signing_key: str | None = None,
    trusted_keys: str | None = None,
    sign: bool = False,
    trust: bool = False,
    signing_variable: str = signing.SIGNING_KEY_VARIABLE,
    trust_variable: str = signing.TRUSTED_KEYS_VARIABLE,
) -> Store:
    """The store. ``sign``: saves sign with ``signing_key`` or $CASSTORE_SIGNING_KEY
    (``signing_variable``). ``trust``: loads use only manifests signed by ``trusted_keys``
    or $CASSTORE_TRUSTED_KEYS (``trust_variable``), when either is set. Keys that cannot
    be read, or a setting given but empty, are an error, before the store is opened or
    created."""
    from casstore.store import Store

    signer = signing.signing_key_from(signing_key, signing_variable) if sign else None
    trusted = signing.trusted_keys_from(trusted_keys, trust_variable) if trust else None
    return Store(
        root_choice().path,
        threads=io_threads(),
        create=create,
        signing_key=signer,
        trusted=trusted,
    )


def build_key(
    torch: str | None, arch: str | None, model: str, tree: str, extra: Iterable[str]
) -> CacheKey:
    """The key the key options name; the factors not given are this host's."""
    from casstore.keys import CacheKey, detect_key, model_label

    extras: dict[str, str] = {"tree": tree}
    model = model_label(model)  # the same label model.py and the sidecar use for this name
    for item in extra:
        name, sep, value = item.partition("=")
        if not (sep and name and value):
            usage_error(f"--extra expects NAME=VALUE, got {item!r}")
        extras[name] = value
    try:
        if torch is not None and arch is not None:
            return CacheKey(torch=torch, arch=arch, model=model, extra=extras)
        detected = detect_key(model, extras, import_torch=arch is None)
        return CacheKey(
            torch=torch or detected.torch,
            arch=arch or detected.arch,
            model=model,
            extra=detected.extra,
        )
    except InvalidManifest as e:  # a factor given that is not a valid label
        usage_error(f"key options: {e}")


# --- values with units ----------------------------------------------------------------------

_BARE_NUMBER = re.compile(r"\s*\d+(?:\.\d+)?\s*")


def _needs_unit(text: str) -> bool:
    return _BARE_NUMBER.fullmatch(text) is not None and float(text) != 0


def parse_duration(text: str, option: str) -> float:
    """``15m``, ``12h``, ``30d`` → seconds. A number without a unit (but 0) is refused: is
    ``30`` seconds or days?"""
    if _needs_unit(text):
        usage_error(f"{option} {text.strip()}: give a unit (s, m, h, d, w), e.g. {text.strip()}d")
    try:
        return config.parse_duration(text)
    except ValueError as e:
        usage_error(f"{option}: {e}")


def parse_size(text: str, option: str) -> int:
    """``500M``, ``10G`` → bytes. A number without a unit (but 0) is refused: is ``500``
    bytes or gigabytes?"""
    if _needs_unit(text):
        usage_error(f"{option} {text.strip()}: give a unit (K, M, G, T), e.g. {text.strip()}G")
    try:
        return config.parse_size(text)
    except ValueError as e:
        usage_error(f"{option}: {e}")


# --- formatting -----------------------------------------------------------------------------


def iso_time(ts: float) -> str:
    """``2026-11-27T10:00:00Z``: JSON's times, UTC."""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def local_time(ts: float) -> str:
    """Times for people, in this host's time zone."""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def duration_text(seconds: float) -> str:
    """``3600`` → ``1h``: the largest unit that divides it."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:g}s"


@contextmanager
def progress(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr, only on a terminal: yields the callback, or None. rich is
    imported only to draw one."""
    if not enabled or not _is_terminal(sys.stderr):
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True, soft_wrap=True, highlight=False, markup=False, emoji=False),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def stdin_is_terminal() -> bool:
    return _is_terminal(sys.stdin)
