"""The ``casstore`` command line, on click; the only package that imports click and rich.

One module per command group over :mod:`casstore.cli.common` (the lazy group, shared
options, output, errors): :mod:`~casstore.cli.store_cmds` (save, load, ls, show, verify,
stats, du), :mod:`~casstore.cli.gc_cmds` (rm, gc), :mod:`~casstore.cli.doctor`,
:mod:`~casstore.cli.explain_cmd`, :mod:`~casstore.cli.keygen` and
:mod:`~casstore.cli.vllm_cmds`; :mod:`~casstore.cli.commands` names them, and only the
module of the command invoked is imported. Without the ``cli`` extra, ``main`` prints one
line saying how to install it.

Exit codes: 0 success; 1 error (one line on stderr); 2 usage error (a bad option value, a
missing directory, a file where a directory is needed, a store root that is a URL); 3 key
not found; 4 incomplete (a load with missing files, a verify that found damage).
"""

from __future__ import annotations

try:
    from casstore.cli.commands import main
except ModuleNotFoundError as e:  # the cli extra is not installed
    from casstore.cli.without_extra import CLI_LIBRARIES

    if e.name not in CLI_LIBRARIES:
        raise
    from casstore.cli.without_extra import main

__all__ = ["main"]
