"""The store's figures in Prometheus' text exposition format (version 0.0.4), for
node_exporter's textfile collector: ``casstore stats --prometheus > …/casstore.prom``.

Every sample carries the store's root as the ``store`` label, so that one host can report
several stores; figures over a window carry the window as given (``--since 7d``: ``7d``)
as ``window``. All are
gauges: counts over a sliding window go down as well as up.
"""

from __future__ import annotations

from collections.abc import Iterable

from casstore.audit import StoreStats
from casstore.usage import Summary

Labels = dict[str, str]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: Labels, value: float) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    number = repr(float(value)) if isinstance(value, float) else str(value)
    return f"{name}{{{inner}}} {number}"


def _family(name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [_sample(name, labels, value) for labels, value in samples]
    return lines


def exposition(store: str, stats: StoreStats, summary: Summary, window: str) -> str:
    """The text a textfile collector reads: store-wide figures, and usage over ``window``."""
    at = {"store": store}
    win = {**at, "window": window}
    lines: list[str] = []
    for name, help_text, value in (
        ("casstore_keys", "Keys with at least one valid manifest.", stats.keys),
        ("casstore_manifests", "Valid manifests.", stats.manifests),
        ("casstore_chunks", "Distinct chunks in the packs.", stats.chunks),
        ("casstore_packs", "Pack objects.", stats.packs),
        ("casstore_stored_bytes", "Bytes of packs and their indexes.", stats.stored_bytes),
        ("casstore_unique_bytes", "Uncompressed bytes of distinct chunks.", stats.unique_bytes),
        ("casstore_logical_bytes", "Bytes of every key's files.", stats.logical_bytes),
        ("casstore_dedup_ratio", "Logical bytes per distinct chunk byte.", stats.dedup_ratio),
    ):
        lines += _family(name, help_text, [(at, value)])
    lines += _family(
        "casstore_loads",
        "Loads in the window, by outcome (complete, partial, miss).",
        [({**win, "outcome": o}, n) for o, n in sorted(summary.loads.items())],
    )
    lines += _family(
        "casstore_model_loads",
        "Loads in the window, by model and outcome.",
        [
            ({**win, "model": model, "outcome": o}, n)
            for model, outcomes in sorted(summary.models.items())
            for o, n in sorted(outcomes.items())
        ],
    )
    lines += _family(
        "casstore_load_hit_ratio",
        "Loads that found their key (complete or partial) per load, in the window.",
        [(win, summary.hit_rate)] if summary.hit_rate is not None else [],
    )
    lines += _family(
        "casstore_restored_files",
        "Files written by loads in the window.",
        [(win, summary.files_restored)],
    )
    lines += _family(
        "casstore_served_bytes",
        "Bytes written by loads in the window.",
        [(win, summary.bytes_served)],
    )
    lines += _family(
        "casstore_saves",
        "Saves in the window, by outcome (saved, unchanged).",
        [({**win, "outcome": o}, n) for o, n in sorted(summary.saves.items())],
    )
    lines += _family(
        "casstore_saved_bytes",
        "New bytes uploaded by saves in the window.",
        [(win, summary.bytes_saved)],
    )
    return "\n".join(lines) + "\n"
