"""The two hand-made anger selections of docs/training.md, written to CSV by one command.

* ``anger_margin.csv``: the built-in anger texts whose nade anger z-score exceeds their sadness
  z-score by at least the median margin (z-scores over the anger, sadness and neutral texts
  together);
* ``anger_fluent.csv``: of those, the texts of at least 6 words whose mean per-token loss under
  the frozen model is at most that set's median.

    python scripts/anger_text_selections.py --out runs/selections
    irm-lens train --data runs/selections/anger_margin.csv --chat ...   (docs/training.md)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import irm_lens
from irm_lens.data.corpora import n_words
from irm_lens.data.dataset import tokenize_texts
from irm_lens.losses import token_nll
from irm_lens.scoring import emotion_scores


def margin_selection(texts: dict[str, list[str]]) -> pd.DataFrame:
    """The anger texts at or above the median (anger z - sadness z) margin."""
    everything = [t for name in ("anger", "sadness", "neutral") for t in texts[name]]
    scores = emotion_scores(everything)
    z = (scores - scores.mean()) / scores.std()
    anger = z.iloc[: len(texts["anger"])]
    margin = (anger["anger"] - anger["sadness"]).to_numpy()
    keep = margin >= np.median(margin)
    return pd.DataFrame({"text": np.array(texts["anger"])[keep], "margin": margin[keep],
                         "anger": scores["anger"].iloc[: len(keep)][keep].to_numpy(),
                         "sadness": scores["sadness"].iloc[: len(keep)][keep].to_numpy()})


@torch.no_grad()
def mean_token_loss(model, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Each text's mean next-token cross-entropy under the frozen model (nats per token)."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize_texts(model, texts[start:start + batch_size], max_length=128)
        nll, weight = token_nll(model(tokens.input_ids), tokens.input_ids, tokens.loss_mask)
        out.append(((nll * weight).sum(1) / weight.sum(1).clamp_min(1)).numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    texts = {n: list(irm_lens.load_alignment(n, progress=False).texts)
             for n in ("anger", "sadness", "neutral")}
    margin = margin_selection(texts)
    margin.to_csv(out / "anger_margin.csv", index=False)
    print(f"margin: {len(margin)} of {len(texts['anger'])} anger texts; mean anger "
          f"{margin.anger.mean():.2f}, sadness {margin.sadness.mean():.2f}")
    model = irm_lens.load_model()
    long = margin[[n_words(t) >= 6 for t in margin.text]].copy()
    long["loss"] = mean_token_loss(model, long.text.tolist())
    fluent = long[long.loss <= long.loss.median()]
    fluent.to_csv(out / "anger_fluent.csv", index=False)
    print(f"fluent: {len(fluent)} of {len(texts['anger'])} anger texts; mean loss "
          f"{fluent.loss.mean():.2f} nats/token; mean anger {fluent.anger.mean():.2f}, "
          f"sadness {fluent.sadness.mean():.2f}")


if __name__ == "__main__":
    main()
