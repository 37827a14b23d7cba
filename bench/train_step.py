"""Benchmark 1: one IRM training step, irm_lens (HookedTransformer + inject) against the same
computation on the Hugging Face LlamaForCausalLM (SDPA attention) with forward hooks.

Equal work on every side: the embedded SmolLM2-135M-Instruct from the same GGUF, frozen; a
`small` IRM on all 30 layers with the same initial weights; the same batch of right-padded
alignment texts (8 x 128 tokens) and the same loss mask; forward, mean next-token cross-entropy
over the scored tokens, backward, Adam on the IRM only. No side gets an attention mask: with
right padding every real token comes before the padding, and padding is masked out of the loss,
so causal attention alone is exact (this is what ``irm_lens.train`` does). Both HF sides read
the IRM's input where irm_lens does (``blocks.0.hook_resid_mid``: the input of layer 0's
post-attention norm) and split its output into layers with one ``unbind``, as ``inject`` does.
The first step's losses of all sides are printed: they agree, which shows the work is the same.

The sides:
- irm_lens: ``inject`` + ``masked_lm_loss`` on the scored positions' logits (``logits_at``:
  what ``train`` does, the same loss and gradient as from all the logits);
- HF natural: ``hf(ids, labels=labels).loss`` with ``labels = -100`` where the mask is 0 (what a
  user of transformers writes);
- HF with irm_lens's loss: ``masked_lm_loss(hf(ids).logits, ids, mask)``.

Steps alternate between the sides so that machine noise hits all alike. Both precisions run in
one command (fp32, then bf16 with the IRM's weights and Adam in fp32).

    python bench/train_step.py [--steps 6] [--dtypes float32,bfloat16] [--threads N]

Prints seconds per step (median) for each side and irm_lens's ratios to both HF sides (goal:
<= 1.10 against HF's natural step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from gpu_llama2_shape import irm_step


def hf_hooks(hf, irm) -> list:
    """Forward hooks that steer ``hf`` as ``inject`` steers a HookedTransformer."""
    state: dict = {}

    def read(module, args):  # input of layer 0's post-attention norm = blocks.0.hook_resid_mid
        delta = irm(args[0])  # [batch, pos, n_layers, d_model]
        state["delta"] = delta.permute(2, 0, 1, 3).unbind(0)

    def write_for(i):
        def write(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + state["delta"][i].to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return write

    layers = hf.model.layers
    hooks = [layers[0].post_attention_layernorm.register_forward_pre_hook(read)]
    return hooks + [layer.register_forward_hook(write_for(i)) for i, layer in enumerate(layers)]


def hf_step(hf, irm, optimizer, loss_fn: Callable[[], torch.Tensor]) -> float:
    hooks = hf_hooks(hf, irm)
    try:
        loss = loss_fn()
    finally:
        for h in hooks:
            h.remove()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)


def bench_dtype(dtype: torch.dtype, steps: int, ids, mask) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    import irm_lens
    from irm_lens import models
    from irm_lens.losses import masked_lm_loss

    model = irm_lens.load_model(device="cpu", dtype=dtype)
    path = models.embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                              attn_implementation="sdpa")
    hf.eval().requires_grad_(False)
    labels = ids.masked_fill(mask == 0, -100)

    torch.manual_seed(0)
    irms = [irm_lens.IRM.for_model(model, layers="all", preset="small") for _ in range(3)]
    for irm in irms[1:]:
        irm.load_state_dict(irms[0].state_dict())
    opts = [torch.optim.Adam(irm.parameters(), lr=1e-4) for irm in irms]

    sides: dict[str, Callable[[], float]] = {
        "irm_lens (inject + masked_lm_loss)": lambda: irm_step(model, irms[0], opts[0], ids, mask),
        "HF natural (labels, -100 on padding)": lambda: hf_step(
            hf, irms[1], opts[1], lambda: hf(input_ids=ids, labels=labels).loss),
        "HF + masked_lm_loss": lambda: hf_step(
            hf, irms[2], opts[2], lambda: masked_lm_loss(hf(input_ids=ids).logits, ids, mask)),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    first = []
    for k in range(steps + 1):  # the first round is a warm-up
        for name, step in sides.items():
            t = time.perf_counter()
            loss = step()
            if k:
                times[name].append(time.perf_counter() - t)
            else:
                first.append(loss)
    # Equal work: the sides' first losses, from the same IRM weights, agree.
    print("  first-step losses (same IRM weights): " + ", ".join(f"{x:.5f}" for x in first))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ts in times.items():
        print(f"  {name:40s} {medians[name]:.3f} s/step  (all: {[round(v, 2) for v in ts]})")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import irm_lens
    from irm_lens.data.dataset import tokenize_texts

    tokenizer_model = irm_lens.load_model(device="cpu")
    texts = irm_lens.load_alignment("anger").texts
    # Full rows of args.seq tokens, and two shorter rows, so that padding and the mask matter.
    batch = [" ".join(texts[12 * k : 12 * k + (12 if k < args.batch - 2 else 2)])
             for k in range(args.batch)]
    data = tokenize_texts(tokenizer_model, batch, max_length=args.seq)
    ids, mask = data.input_ids, data.loss_mask
    del tokenizer_model
    print(f"batch {tuple(ids.shape)}, {int(mask.sum())} scored tokens, "
          f"threads {torch.get_num_threads()}")
    ratios = []
    for name in args.dtypes.split(","):
        print(f"{name}:")
        m = bench_dtype(getattr(torch, name), args.steps, ids, mask)
        lens, natural, same = m.values()
        ratios.append(f"{name}: irm_lens / HF natural {lens / natural:.2f} (goal <= 1.10), "
                      f"irm_lens / HF + masked_lm_loss {lens / same:.2f}")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
