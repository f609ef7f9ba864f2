from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest

from casstore import CacheKey
from casstore import keys as k
from casstore.errors import InvalidManifest, KeyUndetermined
from tests import cpu_host
from tests.helpers import stand_in_torch, write_tree


def test_id_is_stable_and_extra_order_free() -> None:
    a = CacheKey(torch="2.13.0+cpu", arch="sm_90", model="m", extra={"cuda": "12.8", "x": "1"})
    b = CacheKey(torch="2.13.0+cpu", arch="sm_90", model="m", extra={"x": "1", "cuda": "12.8"})
    assert a.id == b.id and len(a.id) == 32


def test_id_is_part_of_the_on_disk_format() -> None:
    """Manifests live under the key id: a change here would orphan every saved cache."""
    key = CacheKey(torch="2.13.0+cpu", arch="sm_90", model="m", extra={"cuda": "12.8"})
    assert key.id == "c36cc5b446f02f51f61c188c53838cb6"


@pytest.mark.parametrize("field", ["torch", "arch", "model"])
def test_every_factor_changes_the_id(field: str) -> None:
    base = CacheKey(torch="2.13.0", arch="sm_90", model="m")
    other = msgspec.structs.replace(base, **{field: "other"})
    assert base.id != other.id
    assert base.id != CacheKey(torch="2.13.0", arch="sm_90", model="m", extra={"a": "b"}).id


@pytest.mark.parametrize("bad", ["", "a\nb", "x" * 201, "tab\there", 'quote"'])
def test_labels_are_validated(bad: str) -> None:
    with pytest.raises(InvalidManifest):
        CacheKey(torch=bad, arch="sm_90")


def test_cpu_isa_label_separates_avx512_from_avx2() -> None:
    avx2 = {
        "sse4_2",
        "ssse3",
        "cx16",
        "popcnt",
        "sse4_1",
        "avx",
        "avx2",
        "bmi1",
        "bmi2",
        "f16c",
        "fma",
        "movbe",
        "xsave",
    }
    avx512 = avx2 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    la = k.cpu_isa_label(avx2, "x86_64")
    lb = k.cpu_isa_label(avx512, "x86_64")
    assert la.startswith("x86-64-v3-") and lb.startswith("x86-64-v4-")
    # Same level, one extension apart (AMX): still different keys.
    assert k.cpu_isa_label(avx512 | {"amx_tile"}, "x86_64") != lb
    # Flags that do not change code generation do not split the key.
    assert k.cpu_isa_label(avx2 | {"hypervisor", "constant_tsc"}, "x86_64") == la


def test_detect_key_reads_this_host_without_importing_torch() -> None:
    code = (
        "import sys, casstore; key = casstore.detect_key('m'); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(key.torch, key.arch)"
    )
    out = subprocess.run(cpu_host.python(code), capture_output=True, text=True, check=True)
    torch_version, arch = out.stdout.split()
    assert torch_version.startswith("2.13.0")
    assert arch == k.detect_cpu_isa()


def test_format_document_states_the_real_key_id() -> None:
    from pathlib import Path

    key = CacheKey(torch="2.13.0+cpu", arch="sm_90", model="m", extra={"cuda": "12.8"})
    doc = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    assert key.canonical().decode() in doc
    assert f"-> id {key.id}" in doc


# --- one key in every process (the torch version) -----------------------------------------

_MODEL_PY_KEY = """
import importlib.metadata, sys
import torch  # the stand-in: model.py has imported torch before it calls casstore
from casstore.compile_cache import _trees
from casstore.config import read_settings
assert (torch.__version__, importlib.metadata.version("torch")) == ("2.11.0+cu130", "2.11.0")
key = _trees(read_settings(cache_dir=sys.argv[1], root=sys.argv[2]), "m")[0].key
print(key.id, key.torch)
"""

_SIDECAR_KEY = """
import sys
from pathlib import Path
from casstore.vllm import Sidecar, SidecarOptions
options = SidecarOptions(cache_root=Path(sys.argv[1]), root=Path(sys.argv[2]), model="m")
key = Sidecar(options)._tree()[1]
assert "torch" not in sys.modules, "the sidecar imported torch"
print(key.id, key.torch)
"""


def test_every_process_keys_a_cuda_wheel_alike(tmp_path: Path) -> None:
    """A PyPI CUDA wheel's metadata says 2.11.0 where torch.__version__ says 2.11.0+cu130:
    model.py (torch imported), the CLI and the sidecar (torch not imported) must still
    compute one key, or what one saves the others never find."""
    site = stand_in_torch(tmp_path / "site", metadata_version="2.11.0", file_version="2.11.0+cu130")
    env = {k: v for k, v in os.environ.items() if k != "CASSTORE_MODEL"}
    env["PYTHONPATH"] = str(site)
    cache, root = tmp_path / "cache", tmp_path / "store"
    write_tree(cache, {"fxgraph/x": b"graph"})

    def python(*argv: str) -> list[str]:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    def cli_key(tree: str) -> tuple[str, str]:
        args = ["--root", str(root), "save", str(cache), "--json", "--model", "m", "--tree", tree]
        out = json.loads(" ".join(python(*cpu_host.cli(), *args)))
        return out["key_id"], out["key"]["torch"]

    model_py = tuple(python(*cpu_host.python(_MODEL_PY_KEY), str(cache), str(root)))
    sidecar = tuple(python(*cpu_host.python(_SIDECAR_KEY), str(cache), str(root)))
    assert model_py == cli_key("inductor")
    assert sidecar == cli_key("vllm")
    assert model_py[1] == sidecar[1] == "2.11.0+cu130"


def test_torch_version_is_read_from_torchs_own_file_without_importing_it(
    tmp_path: Path,
) -> None:
    site = stand_in_torch(tmp_path, metadata_version="2.11.0", file_version="2.11.0+cu130")
    code = (
        "import sys; from casstore.keys import detect_torch_version; "
        "print(detect_torch_version(), 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["2.11.0+cu130", "False"]


# --- fail closed on GPU hosts -------------------------------------------------------------


@pytest.fixture
def gpu_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host with a visible GPU device node, no nvidia-smi on PATH and torch not imported.
    Returns the (empty) PATH directory, where a test may put an nvidia-smi."""
    node = tmp_path / "nvidia0"
    node.touch()
    monkeypatch.setattr(k, "GPU_DEVICE_PATHS", (str(node),))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    return bin_dir


def _fake_torch(**cuda: Any) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.cuda = types.SimpleNamespace(**cuda)  # type: ignore[attr-defined]
    return torch


def test_undeterminable_gpu_arch_is_an_error_not_the_cpu_key(gpu_node: Path) -> None:
    with pytest.raises(KeyUndetermined, match="GPU"):
        k.detect_key("m")


def test_torch_raising_on_a_gpu_host_is_an_error(
    gpu_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> bool:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setitem(sys.modules, "torch", _fake_torch(is_available=broken))
    with pytest.raises(KeyUndetermined, match="CUDA driver initialization failed"):
        k.detect_arch()


def test_cpu_torch_on_a_gpu_host_keys_as_cpu(
    gpu_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU build of torch compiles CPU kernels even where a GPU is visible: honest."""
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(is_available=lambda: False))
    assert k.detect_arch() == (k.detect_cpu_isa(), {})


def test_gpu_keys_carry_the_cpu_isa_from_torch_and_from_nvidia_smi(
    gpu_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inductor builds CPU-side code of a GPU graph with -march=native too."""
    smi = gpu_node / "nvidia-smi"
    smi.write_text(fake_smi([("0", "GPU-1111aaaa", "9.0", "NVIDIA H100 80GB HBM3")]))
    smi.chmod(0o755)
    from_smi = k.detect_key("m")
    monkeypatch.setitem(
        sys.modules,
        "torch",
        _fake_torch(
            is_available=lambda: True,
            get_device_capability=lambda: (9, 0),
            get_device_name=lambda: "NVIDIA H100 80GB HBM3",
        ),
    )
    arch, extra = k.detect_arch()
    assert (
        (from_smi.arch, from_smi.extra["device"])
        == (arch, extra["device"])
        == (
            "sm_90",
            "NVIDIA H100 80GB HBM3",
        )
    )
    assert from_smi.extra["cpu"] == extra["cpu"] == k.detect_cpu_isa()


def test_a_mig_slice_keys_like_its_gpu_in_every_process(
    gpu_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch names a MIG slice "<GPU> MIG 1g.10gb"; nvidia-smi names the GPU. Both paths
    must give one key (torch keeps the slice apart inside its own cache key anyway)."""
    smi = gpu_node / "nvidia-smi"
    smi.write_text(fake_smi([("0", "GPU-2222bbbb", "8.0", "NVIDIA A100-SXM4-80GB")]))
    smi.chmod(0o755)
    from_smi = k.detect_key("m")
    monkeypatch.setitem(
        sys.modules,
        "torch",
        _fake_torch(
            is_available=lambda: True,
            get_device_capability=lambda: (8, 0),
            get_device_name=lambda: "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
        ),
    )
    assert k.detect_key("m") == from_smi


def test_nvidia_smi_asks_about_the_first_visible_gpu(
    gpu_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's device 0 is the first GPU of CUDA_VISIBLE_DEVICES, not physical GPU 0 (on a
    host with GPUs of different models, in PCI order as nvidia-smi lists them)."""
    smi = gpu_node / "nvidia-smi"
    smi.write_text(MIXED_HOST)
    smi.chmod(0o755)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    for visible in ("3,1", "GPU-3333", "GPU-3333cccc-full-uuid"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        arch, extra = k.detect_arch()
        assert (arch, extra["device"]) == ("sm_90", "NVIDIA H100 80GB HBM3"), visible


def fake_smi(gpus: list[tuple[str, str, str, str]]) -> str:
    """An nvidia-smi that lists ``gpus`` (index, uuid, compute capability, name) for
    --query-gpu=index,uuid,compute_cap,name, in PCI order."""
    lines = "".join(f"echo '{', '.join(g)}'\n" for g in gpus)
    return f"#!/bin/sh\n{lines}"


MIXED_HOST = fake_smi(
    [
        ("0", "GPU-0000aaaa-full-uuid", "8.0", "NVIDIA A100-SXM4-80GB"),
        ("3", "GPU-3333cccc-full-uuid", "9.0", "NVIDIA H100 80GB HBM3"),
    ]
)


def test_gpus_of_different_models_in_cuda_order_fail_closed(
    gpu_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA orders GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID; nvidia-smi lists
    them in PCI order. With different models that is a guess: refused, never made."""
    smi = gpu_node / "nvidia-smi"
    smi.write_text(MIXED_HOST)
    smi.chmod(0o755)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(KeyUndetermined, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        k.detect_arch()


def test_identical_gpus_key_alike_whatever_cuda_visible_devices_says(
    gpu_node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a host of identical GPUs (the usual node) which one is device 0 does not matter:
    abbreviated or MIG UUIDs in CUDA_VISIBLE_DEVICES must not make the key fail."""
    smi = gpu_node / "nvidia-smi"
    smi.write_text(
        fake_smi(
            [
                ("0", "GPU-aaaa0000", "9.0", "NVIDIA H100 80GB HBM3"),
                ("1", "GPU-bbbb1111", "9.0", "NVIDIA H100 80GB HBM3"),
            ]
        )
    )
    smi.chmod(0o755)
    for visible in ("1", "GPU-bbbb", "MIG-GPU-bbbb1111/1/0", "MIG-4f3c2b1a"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert k.detect_arch()[0] == "sm_90", visible


@pytest.mark.parametrize("hidden", ["", "-1"])
def test_gpus_hidden_from_cuda_key_as_cpu_without_torch_too(
    gpu_node: Path, monkeypatch: pytest.MonkeyPatch, hidden: str
) -> None:
    """CUDA_VISIBLE_DEVICES="" (or -1) hides every GPU from torch, which then compiles for
    the CPU: a process without torch must say the same."""
    smi = gpu_node / "nvidia-smi"
    smi.write_text(fake_smi([("0", "GPU-1111aaaa", "9.0", "NVIDIA H100 80GB HBM3")]))
    smi.chmod(0o755)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
    assert k.detect_arch() == (k.detect_cpu_isa(), {})


@pytest.mark.parametrize("name", ["org/m@v1", "a~b", "ünï", "x" * 300, "m\n"])
def test_model_labels_stay_within_the_documented_label_characters(name: str) -> None:
    """Readers of older versions accept only [A-Za-z0-9._+-:/= ] in a label: a label they
    refuse makes them treat the key as invalid (and an old gc sweep its chunks)."""
    label = k.model_label(name)
    assert re.fullmatch(r"[A-Za-z0-9._+\-:/= ]{1,200}", label), label


def test_a_label_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(InvalidManifest):
        k.CacheKey(torch="t", arch="a", model="m\n")
