"""Smoke run: ``irm_lens.predict_dominant`` end to end on a Llama-2-7B-*shaped* HookedTransformer.

Real config (d_model 4096, 32 layers, 32 heads, d_mlp 11008, vocab 32000), random weights,
bf16, a byte-level tokenizer. With random weights the ranking means nothing: this shows that
the forecast runs at the paper's scale (index 1512 exists, memory and time are reasonable).
With the real weights, run ``irm-lens predict meta-llama/Llama-2-7b-chat-hf --dtype bfloat16
--alignment anger`` instead (docs/reproducing-llama2.md).

    python bench/predict_llama2_shape.py                 # full depth; ~14 GB of RAM in bf16
    python bench/predict_llama2_shape.py --n-layers 2    # quicker
    python bench/predict_llama2_shape.py --tiny          # seconds, small shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import torch
from gpu_llama2_shape import build, llama2_7b_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--n-layers", type=int, default=None, help="fewer than 32 layers")
    parser.add_argument("--n-texts", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    import irm_lens
    from irm_lens.models import byte_level_tokenizer

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    spec = llama2_7b_spec(args.tiny)
    if args.n_layers:
        spec = dataclasses.replace(spec, n_layers=args.n_layers)
    start = time.perf_counter()
    model = build(spec, device, torch.bfloat16)
    model.set_tokenizer(byte_level_tokenizer(), default_padding_side="right")
    print(f"built {spec.n_layers} layers, d_model {model.cfg.d_model}, bf16, {device}, in "
          f"{time.perf_counter() - start:.0f} s")
    texts = list(irm_lens.load_alignment("anger").texts[: args.n_texts])
    start = time.perf_counter()
    prediction = irm_lens.predict_dominant(
        model, texts, k=5, batch_size=8, max_length=args.max_length, progress=False
    )
    seconds = time.perf_counter() - start
    print(prediction.table().round(3).to_string(index=False))
    print(prediction.summary())
    if model.cfg.d_model > 1512:
        rank = prediction.ranking.index(1512) + 1
        print(f"index 1512 ranks {rank} of {model.cfg.d_model} (random weights: meaningless)")
    print(f"predict_dominant: {seconds:.0f} s for {prediction.n_batches} batches of 8 x "
          f"{args.max_length} tokens; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
