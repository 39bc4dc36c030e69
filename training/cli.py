"""``python -m training``: run every (experiment, loss, seed) of a config, then write reports."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch

from . import config, distributed, report
from .backbones import IMAGENET_BACKBONES, random_init_note
from .distributed import Context
from .engine import Run


def run_experiment(cfg: dict, ctx: Context) -> None:
    """Every loss and seed of one experiment, then its table (printed) and report files."""
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    out = Path(cfg["out_dir"]) / cfg["name"]
    if ctx.is_main and cfg["backbone"] in IMAGENET_BACKBONES and not cfg["pretrained"]:
        print(f"[{cfg['name']}] note: {random_init_note(cfg['backbone'])}", flush=True)
    results = []
    for loss in cfg["losses"]:
        for seed in range(cfg["seed"], cfg["seed"] + cfg["seeds"]):
            result = Run(cfg, loss, seed, out / loss / f"seed{seed}", ctx).fit()
            if ctx.is_main:
                scores = ", ".join(f"{k} {v:.1f}" for k, v in result["best"].items()
                                   if k != "epoch")
                print(f"[{cfg['name']}] {loss} seed {seed}: best epoch "
                      f"{result['best']['epoch']}, {scores} ({result['seconds']:.0f} s)",
                      flush=True)
                results.append(result)
    if ctx.is_main:
        title = f"{cfg['name']} ({cfg['dataset']}, {cfg['backbone']})"
        print("\n" + report.write(out, results, cfg["recall_ks"], cfg["ndcg_ks"], title))
        print(f"report: {out / 'report.md'}, {out / 'report.csv'}, plots in {out}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    name, configs, args = config.from_argv(argv)
    if args.print_config:
        print(json.dumps(configs, indent=1))
        return 0
    start = time.perf_counter()
    ctx = distributed.init(configs[0]["device"])
    with warnings.catch_warnings():
        # Said once per experiment by run_experiment rather than once per run.
        warnings.filterwarnings("ignore", message=".*training from random initialisation")
        try:
            for cfg in configs:
                run_experiment(cfg, ctx)
        finally:
            distributed.shutdown(ctx)
    if ctx.is_main:
        print(f"total wall time {time.perf_counter() - start:.0f} s ({name} config)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
