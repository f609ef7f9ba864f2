"""Cache keys: which compiled artifacts may be served to which replica.

A key is (torch version, accelerator arch, model fingerprint) plus free-form extra factors.
Kernels compiled for one key must never be served to another: CPU kernels are built with
``-march=native`` (an AVX-512 kernel crashes an AVX2-only host) and torch keys GPU caches by
device *name*, so both belong in the key.

Detection never imports torch: it reads torch's own version file, installed package
metadata and ``/proc/cpuinfo``. Only when torch is *already* imported (a model server) is
the GPU queried through torch. Detection fails closed: where a GPU is visible but its arch
cannot be determined, it raises :class:`KeyUndetermined` rather than fall back to the CPU key.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import blake3
import msgspec

from casstore.errors import InvalidManifest, KeyUndetermined

# Part of the format (docs/format.md): readers of every version accept these labels.
_LABEL_RE = re.compile(r"[A-Za-z0-9._+\-:/= ]{1,200}")
_LABEL_CHARS_RE = re.compile(r"[^A-Za-z0-9._+\-:/= ]")


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


def model_label(name: str) -> str:
    """A model name as people write it (``org/model@v1``, ``meta-llama/Llama-3.1-8B``,
    any Unicode, any length) as a key label.

    A name that is a valid label already is used as it is, so existing keys keep their
    ids. Any other is made one: characters outside the label set become ``_``, the result
    is cut to 160 characters, and ``+`` plus 16 hex digits of the BLAKE3 of the full name
    keep two different names apart."""
    name = unicodedata.normalize("NFC", name.strip()) or "default"
    if _LABEL_RE.fullmatch(name):
        return name
    readable = _LABEL_CHARS_RE.sub("_", name)[:160]
    return f"{readable}+{blake3.blake3(name.encode()).hexdigest(length=8)}"


def _check_label(name: str, value: object) -> None:
    if not isinstance(value, str) or not _LABEL_RE.fullmatch(value):
        raise InvalidManifest(
            f"key field {name}={value!r} must be 1-200 characters of letters, digits, "
            "spaces and ._+-:/="
        )


# --- environment detection ----------------------------------------------------------------


def installed_version(dist: str) -> str | None:
    """Version of an installed distribution, without importing it."""
    from importlib import metadata  # ~15 ms to import: only when a version is looked up

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ``__version__ = '2.11.0+cu130'`` in torch/version.py (torch's build writes it).
_TORCH_VERSION_RE = re.compile(r"""^__version__\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]""", re.M)


def detect_torch_version() -> str:
    """torch's version with its build tag (``2.13.0+cpu``), or ``none`` without torch.

    Read from ``torch/version.py``, the file ``torch.__version__`` comes from, never from
    the imported module nor first from package metadata: a PyPI CUDA wheel's metadata says
    ``2.11.0`` where ``torch.__version__`` says ``2.11.0+cu130``, and the key must be the
    same in model.py (torch imported) as in the CLI and the sidecar (torch not imported).
    """
    path = _torch_version_file()
    if path is not None:
        try:
            found = _TORCH_VERSION_RE.search(path.read_text(errors="replace"))
        except OSError:
            found = None
        if found:
            return found.group(1)
    return installed_version("torch") or "none"


def _torch_version_file() -> Path | None:
    """torch/version.py of the torch that ``import torch`` loads (or has loaded), found
    without importing it; else the one the installed distribution lists."""
    try:
        spec = importlib.util.find_spec("torch")  # a top-level name: imports nothing
    except (ImportError, ValueError):  # ValueError: a torch in sys.modules without a spec
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "version.py"
        if candidate.is_file():
            return candidate
    from importlib import metadata

    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.as_posix() == "torch/version.py":
            return Path(str(dist.locate_file(file)))
    return None


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


# What reveals a GPU without loading any GPU library: the NVIDIA driver's proc entry and
# device node, AMD's compute node. Module-level so tests can point it at files of their own.
GPU_DEVICE_PATHS: tuple[str, ...] = ("/proc/driver/nvidia/gpus", "/dev/nvidia0", "/dev/kfd")


def visible_gpu_path() -> str | None:
    """The first of :data:`GPU_DEVICE_PATHS` that exists, or None; None too when
    CUDA_VISIBLE_DEVICES is set to nothing (or -1): that hides every GPU from torch, which
    then compiles for the CPU, so every process must key as CPU."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return None
    return next((p for p in GPU_DEVICE_PATHS if Path(p).exists()), None)


def gpu_visible() -> bool:
    """Whether this host exposes an NVIDIA or AMD GPU to CUDA, without loading any GPU
    library."""
    return visible_gpu_path() is not None


_MIG_SUFFIX_RE = re.compile(r"\s+MIG\s.*$")


def _gpu_arch(arch: str, device: str) -> tuple[str, dict[str, str]]:
    # The CPU ISA too: inductor builds the CPU-side code of a GPU graph (its C++ wrapper,
    # ops on CPU tensors) with -march=native, so such a .so can crash (SIGILL) on an older
    # CPU. A crash is worse than a miss, and the GPU nodes of one type share CPUs.
    # The device is the GPU model: torch names a MIG slice "<GPU> MIG 1g.10gb" where
    # nvidia-smi names the GPU, and both must give one key (torch's own cache keys tell
    # slices apart inside the key's files).
    return arch, {"device": _MIG_SUFFIX_RE.sub("", device.strip()), "cpu": detect_cpu_isa()}


def _first_visible_gpu() -> str:
    """nvidia-smi's ``--id`` for torch's device 0: the first entry of CUDA_VISIBLE_DEVICES
    (an index or a UUID), else GPU 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def detect_arch(*, import_torch: bool = False) -> tuple[str, dict[str, str]]:
    """The accelerator arch and extra factors (GPU: device name and CPU ISA) of this host.

    In a process that has imported torch (a model server), torch answers. Elsewhere (the
    CLI, the vLLM sidecar) ``nvidia-smi`` answers, so no CUDA context is created on a GPU
    that the server needs; ``import_torch`` allows importing torch when nvidia-smi is
    missing. The CUDA version is not a separate factor: torch's build tag (``+cu128``)
    in the torch factor already carries it.

    Raises :class:`KeyUndetermined` when a GPU is visible but neither answers: the CPU key
    would let hosts with different GPUs (same CPU) share kernels.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return _torch_arch(torch)
    where = visible_gpu_path()
    if where is None:
        return detect_cpu_isa(), {}
    found = _nvidia_smi_arch()
    if found is not None:
        return found
    if import_torch:
        try:
            import torch as imported
        except Exception as e:
            raise KeyUndetermined(
                f"a GPU is visible ({where}) but its arch cannot be determined: nvidia-smi "
                f"is missing or failed and torch cannot be imported ({type(e).__name__}: {e})"
            ) from e
        return _torch_arch(imported)
    raise KeyUndetermined(
        f"a GPU is visible ({where}) but its arch cannot be determined: nvidia-smi is "
        "missing or failed and torch is not imported; put nvidia-smi on PATH"
    )


def _torch_arch(torch: object) -> tuple[str, dict[str, str]]:
    """The arch as the imported torch sees it. CUDA unavailable (a CPU build of torch, or
    no usable GPU) is the CPU key, honestly: torch compiles CPU kernels then."""
    cuda: Any = getattr(torch, "cuda", None)
    try:
        if not cuda.is_available():
            return detect_cpu_isa(), {}
        major, minor = cuda.get_device_capability()
        device = str(cuda.get_device_name())
    except Exception as e:
        raise KeyUndetermined(
            f"the GPU arch cannot be determined: torch.cuda raised {type(e).__name__}: {e}"
        ) from e
    return _gpu_arch(f"sm_{major}{minor}", device)


def _nvidia_smi_arch() -> tuple[str, dict[str, str]] | None:
    """(``sm_XY``, {"device": name, "cpu": ISA}) of torch's device 0 (the first visible
    GPU) from nvidia-smi, or None when nvidia-smi is missing or fails.

    On a host of identical GPUs (the usual node) any of them answers. With GPUs of
    different models, device 0 is the first of ``CUDA_VISIBLE_DEVICES`` (an index or a
    possibly abbreviated ``GPU-`` UUID) in PCI order, which is nvidia-smi's order and
    CUDA's only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; otherwise, or when the entry cannot
    be matched, :class:`KeyUndetermined`: a guess could share one GPU's kernels with another.
    """
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,uuid,compute_cap,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        gpus = []
        for line in out.strip().splitlines():
            index, uuid, cap, name = (part.strip() for part in line.split(",", 3))
            major, minor = cap.split(".")
            gpus.append((index, uuid, f"sm_{int(major)}{int(minor)}", name))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not gpus:
        return None
    models = {(arch, _MIG_SUFFIX_RE.sub("", name)) for _, _, arch, name in gpus}
    if len(models) == 1:
        arch, name = models.pop()
        return _gpu_arch(arch, name)
    listed = ", ".join(sorted(f"{arch} {name}" for arch, name in models))
    if os.environ.get("CUDA_DEVICE_ORDER", "").strip() != "PCI_BUS_ID":
        raise KeyUndetermined(
            f"this host has GPUs of different models ({listed}) and CUDA orders them fastest "
            "first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, while nvidia-smi lists them in PCI "
            "order: set CUDA_DEVICE_ORDER=PCI_BUS_ID"
        )
    first = _first_visible_gpu()
    for index, uuid, arch, name in gpus:
        if first == index or (first.startswith("GPU-") and uuid.startswith(first)):
            return _gpu_arch(arch, name)
    raise KeyUndetermined(
        f"CUDA_VISIBLE_DEVICES names {first!r} as the first GPU, which nvidia-smi does not "
        f"list by index or GPU- UUID, on a host with GPUs of different models ({listed})"
    )


def detect_key(
    model: str = "default", extra: dict[str, str] | None = None, *, import_torch: bool = False
) -> CacheKey:
    """The key of this process's environment for ``model``: the same in every process of a
    host, whether it has imported torch or not. Raises :class:`KeyUndetermined` where a GPU
    is visible but its arch cannot be determined (:func:`detect_arch`)."""
    arch, arch_extra = detect_arch(import_torch=import_torch)
    merged = {**arch_extra, **(extra or {})}
    triton = installed_version("triton")
    if triton and "triton" not in merged:
        merged["triton"] = triton
    # Inductor emits Python source and pickles whose validity depends on the interpreter.
    merged.setdefault("python", f"{sys.version_info.major}.{sys.version_info.minor}")
    return CacheKey(torch=detect_torch_version(), arch=arch, model=model, extra=merged)
