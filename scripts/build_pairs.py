"""Join `irm-lens pairs` files into one, re-applying today's filter for chosen replies.

A row stays kept only if its chosen reply has at least ``--min-words`` words (older files were
written before `generate_pairs(min_words=8)` existed; their short, question-restating chosen
replies are kept in the file but marked ``kept: false``).

    python scripts/build_pairs.py OLD.jsonl NEW1.jsonl NEW2.jsonl ... --out anger.jsonl
"""

from __future__ import annotations

import argparse

import pandas as pd

from irm_lens._io import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    table = pd.concat([pd.read_json(f, lines=True) for f in args.files], ignore_index=True)
    table["degenerate"] = table["degenerate"].fillna("")
    table["kept"] = table.kept & (table.chosen.str.split().str.len() >= args.min_words)
    atomic_write_text(args.out, table.to_json(orient="records", lines=True))
    print(f"{args.out}: {len(table)} questions, {int(table.kept.sum())} pairs kept, "
          f"{int((table.kept & (table.degenerate != '')).sum())} with a degenerate reply")


if __name__ == "__main__":
    main()
