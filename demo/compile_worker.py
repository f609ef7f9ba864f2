"""One model-server start, run as its own process: optionally load the compile cache,
compile a small model with torch.compile, time the first call, optionally save the cache.

Prints one JSON line: timings, torch's cache counters, statuses. Used by the tests, the
demo (`make demo`) and the compile benchmark, so all three measure the same thing.
``--load --save`` is model.py's pattern: load, compile and warm up, then save whatever the
load returned (the save uploads only what is new and returns SKIPPED otherwise).

    python -m demo.compile_worker --model mlp [--load] [--save] [--root R]

The inductor cache dir comes from TORCHINDUCTOR_CACHE_DIR, as in production.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import TYPE_CHECKING

from casstore import load_compile_cache, save_compile_cache

if TYPE_CHECKING:
    import torch  # imported at run time only after the cache is loaded


def build(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        x = torch.randn(32, 64)
    elif name == "conv":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )
        x = torch.randn(8, 3, 32, 32)
    else:
        raise SystemExit(f"unknown model {name}")
    return model.eval(), x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

    import torch
    from torch._dynamo.utils import counters

    result: dict[str, object] = {"model": args.model}
    if args.load:
        t = time.perf_counter()
        result["load_status"] = load_compile_cache(root=args.root, model=args.model).name
        result["load_seconds"] = time.perf_counter() - t

    model, x = build(args.model)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)
        t = time.perf_counter()
        got = compiled(x)
        result["first_call_seconds"] = time.perf_counter() - t
    result["matches_eager"] = bool(torch.allclose(got, expected, atol=1e-5, rtol=1e-4))
    result["counters"] = {
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
    }
    if args.save:
        t = time.perf_counter()
        result["save_status"] = save_compile_cache(root=args.root, model=args.model).name
        result["save_seconds"] = time.perf_counter() - t
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
