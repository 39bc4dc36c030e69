"""``python -m training``: run every (experiment, loss, seed) of a config, then write reports.

An error the user can fix (a config value, a missing dataset, a bad checkpoint, a missing extra)
prints one line and exits with status 2; everything that can be checked before data is read is.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from . import config, distributed
from .backbones import IMAGENET_BACKBONES, random_init_note
from .config import ConfigError
from .distributed import Context

# Import names of what the [train] extra installs. Checked before anything trains: matplotlib, for
# one, is first needed by the report, after the last run.
TRAIN_EXTRA = ("PIL", "scipy", "sklearn", "tqdm", "matplotlib")


def run_experiment(cfg: dict, ctx: Context) -> list[dict]:
    """Every loss and seed of one experiment, then its table (printed) and report files; returns
    the runs' results (on the main rank; empty on the others)."""
    from . import engine, report

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    out = Path(cfg["out_dir"]) / cfg["name"]
    if ctx.is_main and cfg["backbone"] in IMAGENET_BACKBONES and not cfg["pretrained"]:
        print(f"[{cfg['name']}] note: {random_init_note(cfg['backbone'])}", flush=True)
    results = []
    for loss, seed, directory in engine.runs(cfg):
        result = engine.Run(cfg, loss, seed, directory, ctx).fit()
        if ctx.is_main:
            scores = ", ".join(f"{k} {v:.1f}" for k, v in result["best"].items() if k != "epoch")
            print(f"[{cfg['name']}] {loss} seed {seed}: best epoch "
                  f"{result['best']['epoch']}, {scores} ({result['seconds']:.0f} s)", flush=True)
            results.append(result)
    if ctx.is_main:
        title = f"{cfg['name']} ({cfg['dataset']}, {cfg['backbone']})"
        print("\n" + report.write(out, results, cfg["recall_ks"], cfg["ndcg_ks"], title))
        print(f"report: {out / 'report.md'}, {out / 'report.csv'}, plots in {out}\n", flush=True)
    return results


def _refuse(message) -> int:
    print(f"python -m training: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        name, configs, args = config.from_argv(argv)
    except ConfigError as err:
        return _refuse(err)
    if args.print_config:
        print(json.dumps(configs, indent=1))
        return 0
    missing = [module for module in TRAIN_EXTRA if importlib.util.find_spec(module) is None]
    if missing:
        return _refuse(f"training needs the [train] extra, which is not installed (no module "
                       f"{', '.join(missing)}): pip install \"mpa-kernels[train]\"")
    from . import datasets, engine, sweep

    try:
        key, grids = sweep.parse(args.sweep, configs) if args.sweep else (None, None)
        return _run(name, configs, key, grids)
    except (ConfigError, datasets.DatasetError, engine.CheckpointError) as err:
        return _refuse(err)


def _run(name: str, configs: list[dict], key, grids) -> int:
    from . import engine, sweep

    start = time.perf_counter()
    config.check_device(configs[0]["device"])
    ctx = distributed.init(configs[0]["device"])
    with warnings.catch_warnings():
        # Said once per experiment by run_experiment rather than once per run.
        warnings.filterwarnings("ignore", message=".*training from random initialisation")
        try:
            # Every experiment (every point of a sweep) before the first one trains.
            for i, cfg in enumerate(configs):
                for point in [cfg] if key is None else [p.cfg for p in grids[i]]:
                    engine.check_experiment(point, ctx)
            for i, cfg in enumerate(configs):
                if key is None:
                    run_experiment(cfg, ctx)
                else:
                    sweep.run(key, grids[i], ctx, run_experiment)
        finally:
            distributed.shutdown(ctx)
    if ctx.is_main:
        print(f"total wall time {time.perf_counter() - start:.0f} s ({name} config)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
