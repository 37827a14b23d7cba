"""GPU benchmark: a Llama-2-7B-*shaped* HookedTransformer (real config, random weights, bf16)
with a paper-sized IRM (fp32, Adam) on all 32 layers: training tokens/s, peak GPU memory, and
model FLOPs utilisation (MFU) of the step, for a few batch sizes.

Real Llama-2-7B weights are not needed (nor available on our machines): the cost of a step does
not depend on the weights' values. One command prints every figure:

    python bench/gpu_llama2_shape.py                 # on a GPU; goal: MFU > 35% on an H100
    python bench/gpu_llama2_shape.py --tiny          # a seconds-long smoke run of the same code on CPU

FLOPs counted per step (T = batch x seq tokens): the host's forward 2 N T plus its backward to
the activations (no weight gradients) ~2 N T, attention scores and values 4 L T seq d_model
forward and twice that backward, and the IRM's forward + backward 6 N_irm T. MFU = counted
FLOPs / step time / peak (bf16 dense peak; --peak-tflops to override, 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import time

import torch


def llama2_7b_spec(tiny: bool):
    from irm_lens.models import LlamaSpec

    if tiny:
        return LlamaSpec("llama2-7b-shape-tiny", 64, 2, 4, 4, 16, 172, 512, 256, 1e-5, 10000.0, True)
    return LlamaSpec("llama2-7b-shape", 4096, 32, 32, 32, 128, 11008, 32000, 512, 1e-5, 10000.0,
                     True)


def build(spec, device: str, dtype: torch.dtype):
    from transformer_lens import HookedTransformer

    from irm_lens.attention import set_attention

    model = set_attention(HookedTransformer(spec.hooked_config(dtype, device)), "sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w") and ("ln" in name):
                p.fill_(1.0)  # RMSNorm weights
            else:
                p.normal_(0.0, 0.02)
    model.eval().requires_grad_(False)
    return model


def irm_step(model, irm, optimizer, ids, loss_mask) -> float:
    """One IRM training step as ``irm_lens.train`` takes it: inject, masked LM loss on the logits
    of the positions it scores, backward, Adam on the IRM (shared with ``train_step.py``);
    returns the loss."""
    import irm_lens
    from irm_lens.losses import logits_at, masked_lm_loss, predicting

    with irm_lens.inject(model, irm):
        loss = masked_lm_loss(logits_at(model, ids, predicting(loss_mask)), ids, loss_mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke test)")
    parser.add_argument("--batches", default="8,16,32", help="batch sizes to try (seq 128)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()

    import irm_lens

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 IRM's matmuls on tensor cores
        print(torch.cuda.get_device_name(0))
    spec = llama2_7b_spec(args.tiny)
    model = build(spec, device, torch.bfloat16)
    n_host = sum(p.numel() for p in model.parameters())
    irm = irm_lens.IRM.for_model(model, layers="all", preset=args.preset)
    n_irm = irm.config.n_params
    opt = torch.optim.Adam(irm.parameters(), lr=1e-4)
    print(f"host: {n_host / 1e9:.2f}B parameters, bf16; IRM ({args.preset}, {irm.config.n_injected} "
          f"layers): {n_irm / 1e9:.2f}B parameters, fp32 + Adam; device {device}")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for batch in [int(b) for b in args.batches.split(",")]:
        seq = 16 if args.tiny else args.seq
        ids = torch.randint(0, spec.d_vocab, (batch, seq), device=device)
        mask = torch.ones_like(ids)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            times = []
            for step in range(args.steps + 2):
                sync()
                t = time.perf_counter()
                irm_step(model, irm, opt, ids, mask)
                sync()
                if step >= 2:  # warm-up excluded
                    times.append(time.perf_counter() - t)
        except torch.cuda.OutOfMemoryError:
            print(f"batch {batch} x {seq}: out of memory")
            torch.cuda.empty_cache()
            break
        step_s = sorted(times)[len(times) // 2]
        tokens = batch * seq
        flops = (4 * n_host * tokens + 12 * spec.n_layers * tokens * seq * spec.d_model
                 + 6 * n_irm * tokens)
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        mfu = flops / step_s / (args.peak_tflops * 1e12)
        print(f"batch {batch} x {seq}: {step_s:.3f} s/step, {tokens / step_s:,.0f} tokens/s, "
              f"peak GPU memory {peak_gb:.1f} GiB, {flops / 1e12:.1f} TFLOP/step, "
              f"{flops / step_s / 1e12:.1f} TFLOP/s, MFU {mfu:.1%} of {args.peak_tflops:g} TFLOP/s")


if __name__ == "__main__":
    main()
