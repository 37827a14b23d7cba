"""Benchmark 3: loading the embedded model, cold (first conversion) and warm (from the cache),
and peak resident memory against the size of its float32 weights.

Each load runs in a fresh subprocess (so that peak RSS is the load's own); the cold load uses an
empty temporary cache directory (IRM_LENS_CACHE). Baseline in the same run: the size of the
float32 weights, and a bare `import torch` process's RSS.

    python bench/load.py          # goals: warm load < 3 s; peak RSS < 2.5 x float32 weights
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
t = time.perf_counter()
if sys.argv[1] == "load":
    import irm_lens
    imported = time.perf_counter()
    model = irm_lens.load_model(device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
else:
    import torch
    imported = time.perf_counter()
    n_params = 0
seconds = time.perf_counter() - imported
import_seconds = imported - t
rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "import_seconds": import_seconds,
                  "peak_rss_mb": rss_kb / 1024, "n_params": n_params}))
"""


def child(kind: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bare = child("bare", env)
    with tempfile.TemporaryDirectory() as cache:
        cold_env = {**env, "IRM_LENS_CACHE": cache}
        cold = child("load", cold_env)
        warm = child("load", cold_env)
    weights_mb = warm["n_params"] * 4 / 2**20
    print(f"float32 weights: {warm['n_params']:,} parameters = {weights_mb:.0f} MB")
    print(f"bare `import torch` process: peak RSS {bare['peak_rss_mb']:.0f} MB")
    for name, r in (("cold (conversion)", cold), ("warm (cache)", warm)):
        print(f"{name:18s}: {r['seconds']:.2f} s (+ {r['import_seconds']:.1f} s to import irm_lens), peak RSS "
              f"{r['peak_rss_mb']:.0f} MB = {r['peak_rss_mb'] / weights_mb:.2f} x weights "
              f"({(r['peak_rss_mb'] - bare['peak_rss_mb']) / weights_mb:.2f} x above a bare torch)")
    print("goals: warm < 3 s; peak RSS < 2.5 x float32 weights")


if __name__ == "__main__":
    main()
