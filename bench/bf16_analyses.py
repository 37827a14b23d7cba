"""Benchmark 4 (analysis half): the analyses with the frozen model in bf16 against fp32.

One IRM (a fixed random `small` IRM on every layer, seeded: the cost of an analysis does not
depend on what the IRM learned) is analysed with the embedded model loaded in float32 and in
bfloat16, in the same run: IRM outputs over steered generations, activation magnitudes,
patching of one index, and the forecast of the dominant index. Prints each stage's time in
both precisions, the speed-up, and whether the conclusions agree (the top indices of the
outputs and of the forecast).

    python bench/bf16_analyses.py      # goal: analyses >= 1.6x faster in bf16, same conclusions
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    import irm_lens
    from irm_lens.analysis.stats import spearman

    texts = list(irm_lens.load_alignment("anger").texts[:16])
    times: dict[str, dict[str, float]] = {}
    found: dict[str, dict] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = irm_lens.load_model(device="cpu", dtype=dtype)
        torch.manual_seed(0)
        irm = irm_lens.IRM.for_model(model, layers="all", preset="small")
        stage: dict[str, float] = {}

        def timed(label, fn):
            t = time.perf_counter()
            out = fn()
            stage[label] = time.perf_counter() - t
            return out

        outputs = timed("IRM outputs (12 prompts, 16 tokens)", lambda: irm_lens.collect_irm_outputs(
            model, irm, n_prompts=12, max_new_tokens=16, progress=False))
        timed("activation magnitudes (16 prompts)", lambda: irm_lens.activation_magnitudes(
            model, n_prompts=16, progress=False))
        top = irm_lens.dominant_neurons(outputs, k=5).indices[0]
        timed("patching one index (16 texts, 2 random)", lambda: irm_lens.patch_neuron(
            model, irm, top, texts, n_random=2, progress=False))
        prediction = timed("forecast (64 texts)", lambda: irm_lens.predict_dominant(
            model, alignment="anger", n_texts=64, progress=False))
        times[name] = stage
        found[name] = dict(mass=outputs.neuron_mass, top=outputs.neuron_mass.topk(5).indices.tolist(),
                           forecast=prediction.indices(5), scores=prediction.scores)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in stage.items()), flush=True)
    total = {k: sum(v.values()) for k, v in times.items()}
    for label in times["float32"]:
        print(f"{label:42s} fp32 {times['float32'][label]:6.1f} s  bf16 {times['bfloat16'][label]:6.1f} s"
              f"  {times['float32'][label] / times['bfloat16'][label]:.2f}x")
    print(f"{'all four':42s} fp32 {total['float32']:6.1f} s  bf16 {total['bfloat16']:6.1f} s  "
          f"{total['float32'] / total['bfloat16']:.2f}x   (goal >= 1.6x)")
    a, b = found["float32"], found["bfloat16"]
    print(f"IRM outputs' top 5: fp32 {a['top']}, bf16 {b['top']}; Spearman of per-index mass "
          f"{spearman(a['mass'], b['mass']):.3f}")
    print(f"forecast's top 5: fp32 {a['forecast']}, bf16 {b['forecast']}; Spearman of scores "
          f"{spearman(a['scores'], b['scores']):.3f}")


if __name__ == "__main__":
    main()
