"""One model-server start, run as its own process: optionally load the compile cache,
compile a small model with torch.compile, time the first call, optionally save the cache.

Prints one JSON line: timings, torch's cache counters, statuses. Used by the tests, the
demo (`make demo`) and the compile benchmark, so all three measure the same thing.
``--load --save`` is model.py's pattern: load, compile and warm up, then save whatever the
load returned (the save uploads only what is new and returns SKIPPED otherwise).

    python -m demo.compile_worker --model mlp [--load] [--save] [--root R] [--device cuda]

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


def build(name: str, device: str) -> tuple[torch.nn.Module, torch.Tensor]:
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
    elif name in TRANSFORMERS:
        layers, width, causal = TRANSFORMERS[name]
        model = tiny_transformer(layers, width, causal)
        x = torch.randint(0, 1000, (4, 64))
    else:
        raise SystemExit(f"unknown model {name}")
    return model.to(device).eval(), x.to(device)


# Transformer variants, so that caches of several architectures can be compared (GPT-style
# causal decoders and a BERT-style encoder): name -> (layers, width, causal).
TRANSFORMERS = {
    "gpt": (2, 256, True),
    "gpt-wide": (2, 512, True),
    "gpt-deep": (4, 384, True),
    "bert": (2, 256, False),
}


def _transformer_class() -> type:
    from torch import nn
    from torch.nn import functional

    class Block(nn.Module):
        def __init__(self, width: int, causal: bool) -> None:
            super().__init__()
            self.causal = causal
            self.heads = 4
            self.norm1 = nn.LayerNorm(width)
            self.qkv = nn.Linear(width, 3 * width)
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width)
            self.mlp = nn.Sequential(
                nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.qkv(self.norm1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            y = functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            out: torch.Tensor = x + self.mlp(self.norm2(x))
            return out

    class Transformer(nn.Module):
        def __init__(self, layers: int, width: int, causal: bool) -> None:
            super().__init__()
            self.embed = nn.Embedding(1000, width)
            self.blocks = nn.Sequential(*(Block(width, causal) for _ in range(layers)))
            self.head = nn.Linear(width, 1000)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.head(self.blocks(self.embed(tokens)))
            return logits

    return Transformer


def tiny_transformer(layers: int, width: int, causal: bool) -> torch.nn.Module:
    model: torch.nn.Module = _transformer_class()(layers, width, causal)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--root", default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

    import torch
    from torch._dynamo.utils import counters

    result: dict[str, object] = {"model": args.model}
    if args.load:
        t = time.perf_counter()
        result["load_status"] = load_compile_cache(root=args.root, model=args.model).name
        result["load_seconds"] = time.perf_counter() - t

    model, x = build(args.model, args.device)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model)
        t = time.perf_counter()
        got = compiled(x)
        if args.device != "cpu":
            torch.cuda.synchronize()  # kernels run asynchronously: time them finished
        result["first_call_seconds"] = time.perf_counter() - t
    # GPU kernels may reorder reductions; the tolerance still catches a wrong kernel.
    atol, rtol = (1e-5, 1e-4) if args.device == "cpu" else (1e-3, 1e-3)
    result["matches_eager"] = bool(torch.allclose(got, expected, atol=atol, rtol=rtol))
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
