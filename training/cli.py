"""``python -m training``: run every (experiment, loss, seed) of a config, then write reports."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch

from training import config, distributed, report
from training.engine import Run


def main(argv: list[str] | None = None) -> int:
    name, configs, args = config.from_argv(argv)
    if args.print_config:
        print(json.dumps(configs, indent=1))
        return 0
    start = time.perf_counter()
    ctx = distributed.init(configs[0]["device"])
    # Say once, not once per run, that a backbone trains from random initialisation.
    warnings.filterwarnings("once", message=".*random initialisation.*")
    try:
        for cfg in configs:
            if cfg["threads"]:
                torch.set_num_threads(cfg["threads"])
            out = Path(cfg["out_dir"]) / cfg["name"]
            results = []
            for loss in cfg["losses"]:
                for seed in range(cfg["seed"], cfg["seed"] + cfg["seeds"]):
                    run = Run(cfg, loss, seed, out / loss / f"seed{seed}", ctx)
                    result = run.fit()
                    if ctx.is_main:
                        best = result["best"]
                        print(f"[{cfg['name']}] {loss} seed {seed}: best epoch {best['epoch']}, "
                              + ", ".join(f"{k} {v:.1f}" for k, v in best.items() if k != "epoch")
                              + f" ({result['seconds']:.0f} s)", flush=True)
                        results.append(result)
            if ctx.is_main:
                title = f"{cfg['name']} ({cfg['dataset']}, {cfg['backbone']})"
                print("\n" + report.write(out, results, cfg["recall_ks"], cfg["ndcg_ks"], title))
                print(f"report: {out / 'report.md'}, {out / 'report.csv'}, plots in {out}\n",
                      flush=True)
    finally:
        distributed.shutdown(ctx)
    if ctx.is_main:
        print(f"total wall time {time.perf_counter() - start:.0f} s ({name} config)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
