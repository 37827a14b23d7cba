"""Benchmark 2: activation collection for the analyses (run_with_cache over N prompts, only the
hooks needed) against a plain forward pass over the same batches, measured in the same run.

    python bench/collect.py [--prompts 64] [--batch 8]     # goal: ratio <= 1.2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformer_lens.utilities import get_act_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import irm_lens
    from irm_lens.analysis.conditions import steered_sequences
    from irm_lens.data.dataset import right_pad

    model = irm_lens.load_model(device="cpu")
    prompts = irm_lens.neutral_prompts(args.prompts, split="eval")
    rows = [ids for ids, _ in steered_sequences(model, None, prompts, max_new_tokens=0)[0]]
    batches = [right_pad(rows[i : i + args.batch], model.tokenizer.pad_token_id or 0)[0]
               for i in range(0, len(rows), args.batch)]
    names = [get_act_name("resid_post", layer) for layer in range(model.cfg.n_layers)]

    def plain() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for ids in batches:
                model(ids)
        return time.perf_counter() - t

    def cached() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for ids in batches:
                _, cache = model.run_with_cache(ids, names_filter=names)
                [cache[n].abs().mean() for n in names]  # what activation_magnitudes reads
        return time.perf_counter() - t

    plain(), cached()  # warm-up
    a, b = [], []
    for _ in range(args.repeats):
        a.append(cached())
        b.append(plain())
    ca, pb = statistics.median(a), statistics.median(b)
    n = len(prompts)
    print(f"{n} prompts in batches of {args.batch}, resid_post of all {model.cfg.n_layers} layers")
    print(f"run_with_cache: {n / ca:.1f} prompts/s; plain forward: {n / pb:.1f} prompts/s")
    print(f"ratio (time) cached / plain: {ca / pb:.2f}  (goal <= 1.20)")


if __name__ == "__main__":
    main()
