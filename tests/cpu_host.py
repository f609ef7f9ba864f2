"""Tests run as on a host without a GPU, wherever they run.

casstore keys a host with a visible GPU (``casstore.keys.GPU_DEVICE_PATHS``: the NVIDIA
driver's proc entry, ``/dev/nvidia0``, ``/dev/kfd``) by that GPU, and fails closed when it
cannot tell which GPU it is. A test that checks the CPU key, or that saves under the detected
key, would then fail or check something else on a GPU runner or a developer's GPU box.
``tests/conftest.py`` hides the host's GPU devices from the test process; children started
with the argv below hide them too. Tests of GPU hosts point ``GPU_DEVICE_PATHS`` at files of
their own.
"""

from __future__ import annotations

import sys

#: Python run first in a child: from then on casstore.keys sees no GPU device.
HIDE_GPU = "import casstore.keys\ncasstore.keys.GPU_DEVICE_PATHS = ()\n"


def python(code: str) -> list[str]:
    """argv of ``python -c code`` in a child that sees no GPU (append the child's args)."""
    return [sys.executable, "-c", HIDE_GPU + code]


def cli() -> list[str]:
    """argv of the ``casstore`` CLI, as ``python -m casstore``, in a child that sees no GPU
    (append the CLI's args)."""
    return python("import sys\nfrom casstore.cli import main\nsys.argv[0] = 'casstore'\nmain()\n")
