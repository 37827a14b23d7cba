"""Benchmark 1: one IRM training step, irm_lens (HookedTransformer + inject) against the same
computation on the Hugging Face LlamaForCausalLM (SDPA attention) with forward hooks.

irm_lens is measured with its default fused attention (``attention="sdpa"``) and, for reference,
with TransformerLens's explicit attention (``"eager"``) on the same model object.

Both sides: the embedded SmolLM2-135M-Instruct from the same GGUF, frozen; a `small` IRM on all
30 layers (same weights); batch 8 x 128 tokens of alignment text; forward, masked LM loss,
backward, Adam step on the IRM only. The IRM reads `blocks.0.hook_resid_mid` in irm_lens; the HF
side has no hook there, so its IRM reads the embeddings instead (same IRM cost, a slightly
different input). Steps alternate between the two sides so that machine noise hits both alike.

    python bench/train_step.py [--steps 6] [--dtype float32|bfloat16] [--threads N]

Prints seconds per step (median) for each side and the ratios to HF (goal for irm_lens: <= 1.1).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpu_llama2_shape import irm_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from transformers import AutoModelForCausalLM

    import irm_lens
    from irm_lens import models
    from irm_lens.attention import set_attention
    from irm_lens.data.dataset import tokenize_texts
    from irm_lens.losses import masked_lm_loss

    model = irm_lens.load_model(device="cpu", dtype=dtype)
    path = models.embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                              attn_implementation="sdpa")
    hf.eval().requires_grad_(False)

    texts = [t for t in irm_lens.load_alignment("anger").texts]
    data = tokenize_texts(model, [" ".join(texts[i : i + 6]) for i in range(0, 6 * args.batch, 6)],
                          max_length=args.seq)
    ids, mask = data.input_ids, data.loss_mask
    print(f"batch {tuple(ids.shape)}, dtype {args.dtype}, threads {torch.get_num_threads()}")

    torch.manual_seed(0)
    irm_a = irm_lens.IRM.for_model(model, layers="all", preset="small")
    irm_b = irm_lens.IRM.for_model(model, layers="all", preset="small")
    irm_b.load_state_dict(irm_a.state_dict())
    opt_a = torch.optim.Adam(irm_a.parameters(), lr=1e-4)
    opt_b = torch.optim.Adam(irm_b.parameters(), lr=1e-4)

    def step_lens(attention: str) -> float:
        set_attention(model, attention)
        t = time.perf_counter()
        irm_step(model, irm_a, opt_a, ids, mask)
        return time.perf_counter() - t

    layers = hf.model.layers
    state: dict = {}

    def read(module, inputs, output):
        state["delta"] = irm_b(output)  # [batch, pos, n_layers, d_model]

    def write_for(i):
        def write(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + state["delta"][:, :, i].to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return write

    hooks = [hf.model.embed_tokens.register_forward_hook(read)]
    hooks += [layer.register_forward_hook(write_for(i)) for i, layer in enumerate(layers)]

    def step_hf() -> float:
        t = time.perf_counter()
        logits = hf(input_ids=ids, attention_mask=data.attention_mask).logits
        loss = masked_lm_loss(logits, ids, mask)
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up
        step_lens("sdpa"), step_lens("eager"), step_hf()
    lens, eager, base = [], [], []
    for _ in range(args.steps):
        lens.append(step_lens("sdpa"))
        eager.append(step_lens("eager"))
        base.append(step_hf())
    for h in hooks:
        h.remove()
    a, e, b = statistics.median(lens), statistics.median(eager), statistics.median(base)

    def show(x: list[float]) -> str:
        return str([round(v, 3) for v in x])

    print(f"irm_lens (HookedTransformer + inject, sdpa):  {a:.3f} s/step  (all: {show(lens)})")
    print(f"irm_lens with attention='eager':              {e:.3f} s/step  (all: {show(eager)})")
    print(f"HF LlamaForCausalLM + hooks (SDPA):            {b:.3f} s/step  (all: {show(base)})")
    print(f"ratio irm_lens / HF: {a / b:.2f}  (goal <= 1.10); eager / HF: {e / b:.2f}")


if __name__ == "__main__":
    main()
