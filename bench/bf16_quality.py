"""Benchmark 4 (quality half): does training with the frozen model in bf16 reach the same IRM?

Trains the same IRM (same seed, same data order) with the embedded model in float32 and in
bfloat16 (IRM and Adam state stay float32 either way), then compares the validation loss (each
measured by its own run), the wall time, and the dominant neurons of the two IRMs.

    python bench/bf16_quality.py [--steps 60]     # goals: val loss within 1%; same conclusions
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    import irm_lens
    from irm_lens.analysis.conditions import score_conditions, text_batches
    from irm_lens.analysis.stats import spearman

    val_texts = list(irm_lens.split_texts(irm_lens.load_alignment("anger").texts, seed=0).val[:32])

    fp32 = irm_lens.load_model(device="cpu")
    config = irm_lens.TrainConfig(lr=1e-3, max_steps=args.steps, max_length=64,
                                  eval_every=args.steps, max_val_batches=4, seed=0)
    results = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = fp32 if dtype == torch.float32 else irm_lens.load_model(device="cpu", dtype=dtype)
        torch.manual_seed(0)
        irm = irm_lens.IRM.for_model(model, layers="all", preset="small", zero_init_output=True)
        t = time.perf_counter()
        result = irm_lens.train(model, irm, "anger", config, progress=False)
        seconds = time.perf_counter() - t
        # Judge both IRMs with the float32 model, so that only the training differs.
        scores = score_conditions(
            fp32, text_batches(fp32, val_texts),
            {"off": lambda ids: nullcontext(),
             "on": lambda ids, irm=result.irm: irm_lens.inject(fp32, irm)}, progress=False,
        ).set_index("condition")["loss"]
        outputs = irm_lens.collect_irm_outputs(fp32, result.irm, n_prompts=12, max_new_tokens=12,
                                               progress=False)
        results[name] = dict(val=float(scores["on"]), seconds=seconds, outputs=outputs)
        print(f"{name}: {seconds:.0f} s for {args.steps} steps; validation loss with the float32 "
              f"model {float(scores['off']):.4f} -> {float(scores['on']):.4f}")
    a, b = results["float32"], results["bfloat16"]
    print(f"speed: bf16 training {a['seconds'] / b['seconds']:.2f}x faster than fp32")
    print(f"validation loss: bf16 / fp32 = {b['val'] / a['val']:.4f} (goal within 1%)")
    da = irm_lens.dominant_neurons(a["outputs"], k=10)
    db = irm_lens.dominant_neurons(b["outputs"], k=10)
    print(f"top neurons fp32 {da.indices[:5]}, bf16 {db.indices[:5]}; top-10 overlap "
          f"{len(set(da.indices) & set(db.indices)) / 10:.1f}; Spearman of per-index mass "
          f"{spearman(a['outputs'].neuron_mass, b['outputs'].neuron_mass):.3f}")


if __name__ == "__main__":
    main()
