"""Why a key misses: the stored keys nearest to this host's, and every factor that differs.

A compile cache misses silently when one factor of the key differs (a torch build tag, a
GPU name variant, a Python minor version). casstore knows both sides, the keys in the
store and the key of this host, so it can say which factor before the replica compiles
cold: ``casstore explain``, and one log line when a load finds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from casstore import config
from casstore.errors import CasstoreError
from casstore.keys import CacheKey

if TYPE_CHECKING:
    from casstore.signing import TrustedKeys
    from casstore.store import KeyInfo, Store

log = logging.getLogger("casstore")

# Key factors in the order they are reported; extra factors not listed follow, by name.
FACTOR_ORDER = ("model", "tree", "torch", "arch", "device", "cpu", "python", "triton")
# A factor absent from one of the keys.
ABSENT = "(none)"
# Stored keys listed for a miss.
NEAREST = 3

# Tree states.
FOUND = "found"
MISSING = "missing"
UNTRUSTED = "untrusted"  # saved, but no trusted key signed it: a load misses


@dataclass(frozen=True)
class Difference:
    """One factor whose value differs: in the stored key, and on this host."""

    factor: str
    stored: str
    here: str


@dataclass(frozen=True)
class Candidate:
    """A stored key and how it differs from the one wanted."""

    key: CacheKey
    differences: tuple[Difference, ...]
    last_saved: float | None = None
    where: str | None = None  # another store root (scope) holding it; None: this store


def factors(key: CacheKey) -> dict[str, str]:
    """Every factor of ``key`` by name: torch, arch, model and each extra factor."""
    return {"torch": key.torch, "arch": key.arch, "model": key.model, **key.extra}


def _order(name: str) -> tuple[int, str]:
    return (FACTOR_ORDER.index(name) if name in FACTOR_ORDER else len(FACTOR_ORDER), name)


def differences(stored: CacheKey, here: CacheKey) -> tuple[Difference, ...]:
    """The factors whose values differ between ``stored`` and ``here``, a factor present
    in only one of them included (its other value is ``(none)``)."""
    a, b = factors(stored), factors(here)
    return tuple(
        Difference(name, a.get(name, ABSENT), b.get(name, ABSENT))
        for name in sorted(set(a) | set(b), key=_order)
        if a.get(name) != b.get(name)
    )


def rank(here: CacheKey, candidate: Candidate) -> tuple[bool, bool, int, float]:
    """Nearest first: the same model, then the same tree, then the fewest differing
    factors, then the most recently saved."""
    names = {d.factor for d in candidate.differences}
    return (
        "model" in names,
        "tree" in names,
        len(names),
        -(candidate.last_saved or 0.0),
    )


def nearest(
    here: CacheKey, stored: Iterable[tuple[CacheKey, float | None]], limit: int = NEAREST
) -> list[Candidate]:
    """The ``limit`` stored keys nearest to ``here`` (``stored``: key and its last save),
    ``here`` itself excluded."""
    found = [
        Candidate(key, differences(key, here), last_saved)
        for key, last_saved in stored
        if key != here
    ]
    found.sort(key=lambda c: rank(here, c))
    return found[:limit]


def describe(candidate: Candidate) -> str:
    """``1a2b3c4d5e6f: torch 2.12.0+cu128 here 2.13.0+cu130, python 3.11 here 3.12``."""
    where = f" in {candidate.where}" if candidate.where else ""
    diffs = ", ".join(f"{d.factor} {d.stored} here {d.here}" for d in candidate.differences)
    return f"{candidate.key.id[:12]}{where}: {diffs or 'no factor differs'}"


def miss_line(here: CacheKey, stored: list[CacheKey], complete: bool) -> str:
    """One log line for a load that found nothing for ``here``: the nearest stored key and
    the factors that differ, or that the store holds nothing near."""
    found = nearest(here, ((k, None) for k in stored), limit=1)
    partial = "" if complete else " (the store listing was cut short)"
    if not found:
        return f"the store holds no other key{partial}"
    best = found[0]
    model_note = (
        ""
        if best.key.model == here.model
        else f"; no key of model {here.model!r} is stored{partial}"
    )
    return f"nearest stored key {describe(best)}{model_note}"


def log_miss(store: Store, here: CacheKey, who: str, budget: float = 1.0) -> None:
    """Log one line naming the nearest stored key and the factors that differ from
    ``here``: a WARNING when a key of the same model is stored (a factor differs: the
    question every cold start raises), INFO otherwise (nothing saved for this model yet).
    Reads one manifest per key, for at most ``budget`` seconds; never raises."""
    try:
        stored, complete = store.stored_keys(budget=budget)
        line = miss_line(here, stored, complete)
        related = any(k.model == here.model for k in stored)
    except Exception as e:  # explaining never fails the load it explains
        log.debug("could not explain the miss of %s: %s", here, e)
        return
    log.log(
        logging.WARNING if related else logging.INFO,
        "%s: no compile cache saved for %s; %s",
        who,
        here,
        line,
    )


@dataclass
class TreeReport:
    """One tree a load would restore: its key, whether it is stored, and if not, the
    nearest stored keys."""

    tree: str
    local_dir: str
    key: CacheKey
    status: str = MISSING
    info: KeyInfo | None = None  # the stored key, when found (or saved but untrusted)
    nearest: list[Candidate] = field(default_factory=list)


@dataclass
class Explanation:
    choice: config.RootChoice
    model: str
    store_exists: bool
    trusted: TrustedKeys | None
    trees: list[TreeReport]


def _open(path: config.StoreRoot) -> Store | None:
    """The store at ``path``; None where a first save would start one (nothing saved
    yet). A store that cannot be reached (a missing bucket, refused credentials) or a
    directory that is not one is an error: "nothing is stored" would mislead."""
    from casstore.compile_cache import no_store_yet
    from casstore.errors import StoreUnavailable
    from casstore.store import Store

    try:
        return Store(path, create=False, record_usage=False)
    except StoreUnavailable:
        if no_store_yet(path):
            return None
        raise


def _other_scopes(choice: config.RootChoice) -> list[tuple[str, Store]]:
    """Stores of the other scopes whose volumes are mounted here, when the root came from
    the scope's volume: a key saved under another scope misses for this one."""
    if choice.source != config.ROOT_SCOPE_VOLUME:
        return []
    found = []
    for scope, mount in sorted(config.SCOPE_MOUNTS.items()):
        if scope != choice.scope and Path(mount).is_dir():
            try:
                store = _open(Path(mount) / "cas")
            except CasstoreError:
                continue  # another scope's trouble is not this host's question
            if store is not None:
                found.append((scope, store))
    return found


def _tree_report(
    tree: str,
    local: str,
    key: CacheKey,
    infos: dict[str, KeyInfo],
    others: list[tuple[str, Store, dict[str, KeyInfo]]],
    scope: str,
    trusted: TrustedKeys | None,
) -> TreeReport:
    report = TreeReport(tree, local, key)
    info = infos.get(key.id)
    if info is not None:
        report.info = info
        if trusted is None or any(trusted.trusts(s) for s in info.signers):
            report.status = FOUND
            return report
        report.status = UNTRUSTED
    candidates = nearest(key, ((i.key, i.last_saved) for i in infos.values()))
    for other_scope, store, other_infos in others:
        there = other_infos.get(key.id)
        if there is not None:
            where = str(store.root)
            scope_diff = Difference("scope", other_scope, scope)
            candidates.insert(0, Candidate(key, (scope_diff,), there.last_saved, where))
    report.nearest = candidates[:NEAREST]
    return report


def explain_host(
    choice: config.RootChoice,
    model: str,
    *,
    vllm: bool = False,
    trusted: TrustedKeys | None = None,
) -> Explanation:
    """For every tree ``load_compile_cache`` (``vllm``: the sidecar) would restore on this
    host from the store ``choice`` names, with the key it would compute: found, saved but
    untrusted, or missing with the nearest stored keys. Detects the key exactly as they
    do; raises :class:`~casstore.errors.KeyUndetermined` where they would fail."""
    from casstore.keys import detect_key

    settings = config.read_settings(root=choice.path, scope=choice.scope)
    if vllm:
        from casstore.vllm import default_cache_root

        trees = [("vllm", str(default_cache_root()), detect_key(model, {"tree": "vllm"}))]
    else:
        from casstore.compile_cache import planned_trees

        trees = [(t, str(p), k) for t, p, k in planned_trees(settings, model)]
    store = _open(choice.path)
    infos = {i.key.id: i for i in store.keys()} if store is not None else {}
    others = [(s, st, {i.key.id: i for i in st.keys()}) for s, st in _other_scopes(choice)]
    return Explanation(
        choice=choice,
        model=model,
        store_exists=store is not None,
        trusted=trusted,
        trees=[_tree_report(t, p, k, infos, others, choice.scope, trusted) for t, p, k in trees],
    )
