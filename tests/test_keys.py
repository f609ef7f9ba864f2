from __future__ import annotations

import msgspec
import pytest

from casstore import CacheKey
from casstore import keys as k
from casstore.errors import InvalidManifest


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
    import subprocess
    import sys

    code = (
        "import sys, casstore; key = casstore.detect_key('m'); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(key.torch, key.arch)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    torch_version, arch = out.stdout.split()
    assert torch_version.startswith("2.13.0")
    assert arch == k.detect_cpu_isa()


def test_format_document_states_the_real_key_id() -> None:
    from pathlib import Path

    key = CacheKey(torch="2.13.0+cpu", arch="sm_90", model="m", extra={"cuda": "12.8"})
    doc = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    assert key.canonical().decode() in doc
    assert f"-> id {key.id}" in doc
