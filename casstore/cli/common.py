"""What every command shares: the typer app and its global options, the consoles, exit
codes and error handling, option types, value parsing, JSON output and formatting.

Global options (``--root``, ``--threads``, ``-v``) are accepted before the command and
after it: each command declares them too and calls :func:`apply_globals`; a value given
after the command wins over one given before it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import sys
import traceback
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
from rich.text import Text

from casstore import __version__, config, signing
from casstore.errors import CasstoreError, InvalidManifest, NotFound, UnsupportedRoot
from casstore.keys import CacheKey, detect_key, model_label
from casstore.store import Store

EXIT_OK = 0
EXIT_ERROR = 1  # anything else: one line on stderr
EXIT_USAGE = 2  # a bad option value, a missing directory, a file where a directory is needed
EXIT_NOT_FOUND = 3  # no such key
EXIT_INCOMPLETE = 4  # a load with missing files, a verify that found damage

app = typer.Typer(
    name="casstore",
    # Plain help: no rich panels, no "<bool>" beside flags; one line per usage error (main).
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Off a terminal, rich would wrap tables at 80 columns; scripts want whole lines.
# markup=False: what is printed includes text anyone who can write the store chose (a
# manifest's producer host, object names); rich markup in it ("[conceal]") must print as
# it is, never restyle or hide what follows. Styles go through rich.text.Text.
out = Console(
    soft_wrap=True,
    width=None if sys.stdout.isatty() else 1000,
    highlight=False,
    markup=False,
    emoji=False,  # ":a:" in a model label (org:a:v1) is text, not an emoji code
)
err = Console(stderr=True, soft_wrap=True, highlight=False, markup=False, emoji=False)


@dataclasses.dataclass
class GlobalOptions:
    """The global options given so far (None: not given)."""

    root: str | None = None
    threads: int | None = None
    verbose: bool = False


options = GlobalOptions()


# --- errors ---------------------------------------------------------------------------------


def say(label: str, style: str, message: str) -> None:
    """``label: message`` as one line on stderr (never parsed as markup)."""
    err.print(Text.assemble((f"{label}:", style), " ", " ".join(message.split())))


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    say("error", "red", message)
    raise typer.Exit(code)


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


def main() -> NoReturn:
    """Run the app; usage errors are one line too, and exit 2."""
    try:
        code = app(standalone_mode=False, prog_name="casstore")
    except typer.TyperException as e:  # usage errors (exit 2) and the like
        say("error", "red", e.format_message())
        sys.exit(e.exit_code)
    except typer.Abort:  # Ctrl-C or end of input at a prompt
        say("error", "red", "aborted")
        sys.exit(EXIT_ERROR)
    except Exception as e:  # a bug: still one line, the traceback with -v
        if options.verbose:
            traceback.print_exc()
        say("error", "red", f"unexpected {type(e).__name__}: {e} (-v shows the traceback)")
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


# --- global options -------------------------------------------------------------------------

# Strings, not Paths: a URL root must be refused before Path() collapses its "//".
RootOpt = Annotated[
    str | None,
    typer.Option(
        "--root",
        metavar="PATH",
        show_default=False,
        help="Store root (default: $CASSTORE_ROOT, else the scope's volume such as "
        "/cache/org/cas when mounted, else ~/.cache/casstore; `casstore doctor` tells).",
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        max=256,
        metavar="N",
        show_default=False,
        help="I/O threads. Default: $CASSTORE_THREADS, else 4 per core (at most 32).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log details on stderr.")]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"casstore {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[
    bool,
    typer.Option(
        "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
]


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


@app.callback(invoke_without_command=True)
def global_options(
    ctx: typer.Context,
    root: RootOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    version: VersionOpt = False,
) -> None:
    """Content-addressed store for torch.compile caches on a shared volume.

    Exit codes: 0 success; 1 error; 2 usage error; 3 key not found; 4 incomplete.
    """
    logging.basicConfig(level=logging.WARNING, format="casstore: %(message)s", stream=sys.stderr)
    apply_globals(root, threads, verbose)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_USAGE)


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
    signer = signing.signing_key_from(signing_key, signing_variable) if sign else None
    trusted = signing.trusted_keys_from(trusted_keys, trust_variable) if trust else None
    return Store(
        root_choice().path,
        threads=io_threads(),
        create=create,
        signing_key=signer,
        trusted=trusted,
    )


# --- option types shared by several commands ------------------------------------------------

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")
]
TorchOpt = Annotated[
    str | None,
    typer.Option(
        "--torch", metavar="VERSION", help="torch version of the key (default: the installed one)."
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        metavar="ARCH",
        help="Accelerator arch of the key: sm_XY or a CPU ISA label (default: this host).",
    ),
]
ModelOpt = Annotated[
    str,
    typer.Option("--model", metavar="MODEL", envvar="CASSTORE_MODEL", help="Model fingerprint."),
]
TreeOpt = Annotated[
    str,
    typer.Option(
        "--tree",
        metavar="TREE",
        help="Tree name, a key factor: 'inductor' (the default) gives the key of "
        "load_compile_cache()/save_compile_cache(), 'vllm' that of `casstore vllm`.",
    ),
]
ExtraOpt = Annotated[
    list[str] | None,
    typer.Option("--extra", metavar="NAME=VALUE", help="Extra key factor (repeatable)."),
]
SigningKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--signing-key",
        metavar="PATH",
        show_default=False,
        help="Sign the manifests published with this private key (`casstore keygen`). "
        "Default: $CASSTORE_SIGNING_KEY.",
    ),
]
TrustedKeysOpt = Annotated[
    str | None,
    typer.Option(
        "--trusted-keys",
        metavar="KEYS",
        show_default=False,
        help="Use only manifests signed by these public keys: ed25519:... separated by "
        "commas, or a file with one per line. Default: $CASSTORE_TRUSTED_KEYS; unset: "
        "every manifest, signed or not.",
    ),
]
KeyRefArg = Annotated[
    str, typer.Argument(metavar="ID", help="Key id or unambiguous id prefix (from `ls`).")
]


def build_key(
    torch: str | None, arch: str | None, model: str, tree: str, extra: list[str] | None
) -> CacheKey:
    """The key the key options name; the factors not given are this host's."""
    extras: dict[str, str] = {"tree": tree}
    model = model_label(model)  # the same label model.py and the sidecar use for this name
    for item in extra or []:
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


# --- output ---------------------------------------------------------------------------------


def emit_json(doc: Any) -> None:
    out.print_json(json.dumps(msgspec.to_builtins(doc)), highlight=False)


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
    """A progress bar on stderr, only on a terminal: yields the callback, or None."""
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


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def stdin_is_terminal() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (OSError, ValueError):
        return False
