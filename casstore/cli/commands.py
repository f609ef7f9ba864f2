"""The ``casstore`` group: its global options, and every command by name, in the order
help lists them, as ``"module:attribute"``: only the invoked command's module is imported
(:class:`~casstore.cli.common.LazyGroup`)."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click

from casstore.cli.common import (
    CONTEXT_SETTINGS,
    EXIT_USAGE,
    LazyGroup,
    apply_globals,
    exit_with,
    global_options,
    run,
    version_option,
)

COMMANDS = {
    "save": "casstore.cli.store_cmds:save",
    "load": "casstore.cli.store_cmds:load",
    "ls": "casstore.cli.store_cmds:list_keys",
    "show": "casstore.cli.store_cmds:show",
    "verify": "casstore.cli.store_cmds:verify",
    "stats": "casstore.cli.store_cmds:stats",
    "du": "casstore.cli.store_cmds:du",
    "rm": "casstore.cli.gc_cmds:rm",
    "gc": "casstore.cli.gc_cmds:gc",
    "doctor": "casstore.cli.doctor:doctor",
    "explain": "casstore.cli.explain_cmd:explain_cmd",
    "keygen": "casstore.cli.keygen:keygen",
    "vllm": "casstore.cli.vllm_cmds:vllm_group",
}


@click.group(
    "casstore",
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    invoke_without_command=True,
    context_settings=CONTEXT_SETTINGS,
)
@global_options
@version_option
@click.pass_context
def app(ctx: click.Context, root: str | None, threads: int | None, verbose: bool) -> None:
    """Content-addressed store for torch.compile caches on a shared volume.

    Exit codes: 0 success; 1 error; 2 usage error; 3 key not found; 4 incomplete.
    """
    logging.basicConfig(level=logging.WARNING, format="casstore: %(message)s", stream=sys.stderr)
    apply_globals(root, threads, verbose)
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        exit_with(EXIT_USAGE)


def main() -> NoReturn:
    """The ``casstore`` command."""
    run(app)


__all__ = ["COMMANDS", "app", "main"]
