"""Benchmark 5: the main job end to end on the embedded model, broken down by stage.

    python bench/main_job.py [--out runs/bench-main]   # a fresh directory: training included
"""

from __future__ import annotations

import argparse
import shutil
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-main")
    args = parser.parse_args()
    import irm_lens
    from irm_lens.investigate import precomputed_summary

    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    model = irm_lens.load_model(device="cpu")
    load = time.perf_counter() - t
    result = irm_lens.investigate(model, args.out, progress=False)
    total = time.perf_counter() - t
    print(f"load: {load:.1f} s")
    for stage, seconds in result.stage_seconds.items():
        print(f"{stage}: {seconds:.1f} s ({seconds / total:.0%})")
    print(f"total: {total:.1f} s; report {result.report_path}")
    print(result.verdict)
    print(precomputed_summary(result.precomputed))


if __name__ == "__main__":
    main()
