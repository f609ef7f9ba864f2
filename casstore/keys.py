"""Cache keys: which compiled artifacts may be served to which replica.

A key is (torch version, accelerator arch, model fingerprint) plus free-form extra factors.
Kernels compiled for one key must never be served to another: CPU kernels are built with
``-march=native`` (an AVX-512 kernel crashes an AVX2-only host) and torch keys GPU caches by
device *name*, so both belong in the key.

Detection never imports torch: it reads installed package metadata and ``/proc/cpuinfo``.
Only when torch is *already* imported (a model server) is the GPU queried.
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from functools import lru_cache
from pathlib import Path

import blake3
import msgspec

from casstore.errors import InvalidManifest

_LABEL_RE = re.compile(r"^[A-Za-z0-9._+\-:/= ]{1,200}$")


class CacheKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The identity of one saved cache. ``extra`` holds further factors (CUDA, Triton, …)."""

    torch: str
    arch: str
    model: str = "default"
    extra: dict[str, str] = {}

    def __post_init__(self) -> None:
        for name in ("torch", "arch", "model"):
            _check_label(name, getattr(self, name))
        for k, v in self.extra.items():
            _check_label("extra key", k)
            _check_label(f"extra[{k}]", v)

    def __hash__(self) -> int:
        # The generated hash would fail on the ``extra`` dict.
        return hash(self.canonical())

    @property
    def id(self) -> str:
        """Stable 32-hex-digit id: BLAKE3 (128-bit output) of the canonical encoding."""
        return blake3.blake3(self.canonical()).hexdigest(length=16)

    def canonical(self) -> bytes:
        """Canonical bytes: JSON with sorted extra keys, so equal keys give equal ids."""
        doc = {
            "torch": self.torch,
            "arch": self.arch,
            "model": self.model,
            "extra": dict(sorted(self.extra.items())),
        }
        return msgspec.json.encode(doc)

    def describe(self) -> str:
        parts = [f"torch={self.torch}", f"arch={self.arch}", f"model={self.model}"]
        parts += [f"{k}={v}" for k, v in sorted(self.extra.items())]
        return " ".join(parts)

    def __str__(self) -> str:
        return f"{self.id[:12]} ({self.describe()})"


def _check_label(name: str, value: object) -> None:
    if not isinstance(value, str) or not _LABEL_RE.match(value):
        raise InvalidManifest(
            f"key field {name}={value!r} must be 1-200 characters of letters, digits, "
            "spaces and ._+-:/="
        )


# --- environment detection ----------------------------------------------------------------


def installed_version(dist: str) -> str | None:
    """Version of an installed distribution, without importing it."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def detect_torch_version() -> str:
    """torch's version with its build tag (``2.13.0+cpu``), or ``none`` without torch."""
    mod = sys.modules.get("torch")
    version = getattr(mod, "__version__", None) if mod is not None else None
    return str(version) if version else (installed_version("torch") or "none")


# CPU flags that change what ``-march=native`` may emit. Hypervisor/bookkeeping flags are
# left out so that two hosts with the same instruction sets share one key.
_ISA_FLAG_RE = re.compile(
    r"^(sse\d.*|ssse3|avx.*|fma.*|f16c|bmi\d|adx|aes|vaes|pclmulqdq|vpclmulqdq|sha_ni|gfni|"
    r"popcnt|lzcnt|abm|movbe|amx.*|cx16|xsave.*|rdrnd|rdrand|rdseed|clflushopt|clwb|"
    r"serialize|waitpkg|movdir.*|sse4a|xop|fma4|tbm|asimd.*|sve.*|sme.*|fp16|bf16|i8mm|dotprod)$"
)

_X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"}),
    ("x86-64-v2", {"cx16", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
)


def cpu_isa_label(flags: set[str], machine: str) -> str:
    """``<level>-<hash of ISA flags>``, e.g. ``x86-64-v4-1a2b3c4d``.

    The level makes the key readable; the hash makes it exact, because two CPUs of one
    level can still differ in an extension that ``-march=native`` uses (AMX, VNNI, …).
    """
    isa = sorted(f for f in flags if _ISA_FLAG_RE.match(f))
    level = machine
    if machine in ("x86_64", "AMD64"):
        level = "x86-64"
        for name, needed in _X86_LEVELS:
            if needed <= flags:
                level = name
                break
    tag = blake3.blake3(" ".join(isa).encode()).hexdigest(length=4)
    return f"{level}-{tag}"


@lru_cache(maxsize=1)
def detect_cpu_isa() -> str:
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    return cpu_isa_label(flags, platform.machine())


def gpu_visible() -> bool:
    """Whether this host exposes an NVIDIA or AMD GPU, without loading any GPU library."""
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/gpus", "/dev/nvidia0", "/dev/kfd"))


def detect_arch(*, import_torch: bool = False) -> tuple[str, dict[str, str]]:
    """The accelerator arch and extra factors (the device name) of this host.

    In a process that has imported torch (a model server), torch answers. Elsewhere (the
    CLI, the vLLM sidecar) ``nvidia-smi`` answers, so no CUDA context is created on a GPU
    that the server needs; ``import_torch`` allows importing torch when nvidia-smi is
    missing. The CUDA version is not a separate factor: torch's build tag (``+cu128``)
    in the torch factor already carries it.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                return f"sm_{major}{minor}", {"device": str(torch.cuda.get_device_name())}
        except Exception:  # a broken CUDA setup falls back to the CPU key
            pass
        return detect_cpu_isa(), {}
    if gpu_visible():
        found = _nvidia_smi_arch()
        if found is not None:
            return found
        if import_torch and installed_version("torch"):
            try:
                import torch as imported

                sys.modules["torch"] = imported
                return detect_arch()
            except Exception:  # a broken torch install keys as CPU
                pass
    return detect_cpu_isa(), {}


def _nvidia_smi_arch() -> tuple[str, dict[str, str]] | None:
    """(``sm_XY``, {"device": name}) of GPU 0 from nvidia-smi, or None."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=compute_cap,name", "--format=csv,noheader", "--id=0"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        cap, name = (part.strip() for part in out.strip().splitlines()[0].split(",", 1))
        major, minor = cap.split(".")
        return f"sm_{int(major)}{int(minor)}", {"device": name}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def detect_key(
    model: str = "default", extra: dict[str, str] | None = None, *, import_torch: bool = False
) -> CacheKey:
    """The key of this process's environment for ``model``."""
    arch, arch_extra = detect_arch(import_torch=import_torch)
    merged = {**arch_extra, **(extra or {})}
    triton = installed_version("triton")
    if triton and "triton" not in merged:
        merged["triton"] = triton
    # Inductor emits Python source and pickles whose validity depends on the interpreter.
    merged.setdefault("python", f"{sys.version_info.major}.{sys.version_info.minor}")
    return CacheKey(torch=detect_torch_version(), arch=arch, model=model, extra=merged)
