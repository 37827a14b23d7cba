"""Benchmark: ``irm_lens.explain`` of one index on the embedded model, time per stage and the
dossier's headline figures (to compare code versions: same figures, less time).

    python bench/explain.py [--irm runs/main/irm/irm.safetensors] [--neuron 17] [--n-random 4]

Without ``--irm`` a random `small` IRM on all 30 layers (seed 0) is explained; the time does not
depend on what the IRM learned.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import irm_lens
from irm_lens.analysis import dossier

STAGES = ("collect_irm_outputs", "patch_neuron", "measure_ablation", "activation_magnitudes",
          "logit_attribution")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--irm", default=None)
    parser.add_argument("--neuron", type=int, default=17)
    parser.add_argument("--alignment", default="anger")
    parser.add_argument("--n-random", type=int, default=4)
    args = parser.parse_args()
    model = irm_lens.load_model(device="cpu")
    if args.irm:
        irm = irm_lens.IRM.load(args.irm, model)
    else:
        torch.manual_seed(0)
        irm = irm_lens.IRM.for_model(model, layers="all", preset="small")
    times: dict[str, float] = {}
    for name in STAGES:  # time each stage where explain calls it
        def timed(*a, _f=getattr(dossier, name), _name=name, **k):
            start = time.perf_counter()
            result = _f(*a, **k)
            times[_name] = time.perf_counter() - start
            return result
        setattr(dossier, name, timed)
    start = time.perf_counter()
    result = irm_lens.explain(model, args.neuron, irm, args.alignment, n_random=args.n_random,
                              progress=False)
    total = time.perf_counter() - start
    print(f"explain: {total:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + ")")
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v)
                      for k, v in result.summary().items()}))


if __name__ == "__main__":
    main()
