"""``python -m benchmarks``: see benchmarks/README.md.

    python -m benchmarks [--quick] [--device D] [--shapes ...] [--losses ...] [--providers ...]
                         [--dtypes ...] [--repeats R] [--threads T] [--out DIR]  # the loss sweep
    python -m benchmarks --predict h100|h200 [--shapes ...] [--losses ...] [--dtypes ...]
                                                                     # roofline predictions alone
    python -m benchmarks metrics [--device D] [--repeats R] [--out DIR]  # the metrics engine
    python -m benchmarks plot RESULTS.json                               # charts of a results file
    python -m benchmarks table RESULTS.json [--losses ...] [--shapes ...]  # markdown tables
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# Relative to the working directory, never the package's own folder (an installed copy lives in
# site-packages); git ignores it in a clone. The committed results are written with --out.
DEFAULT_OUT = Path("benchmark-results")
PROTOCOL_SHAPES = ("cub", "sop32", "sop256", "large")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _loss_parser() -> argparse.ArgumentParser:
    from .providers import LOSSES, QUICK_LOSSES
    from .shapes import FULL, QUICK, SHAPES

    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time and peak memory of every loss provider side by side "
                    "(sub-commands: 'metrics', 'plot'; see benchmarks/README.md).")
    p.add_argument("--device", default=_default_device())
    p.add_argument("--quick", action="store_true",
                   help=f"small shapes ({', '.join(QUICK)}), three losses, 3 repeats: a few "
                        "minutes on a CPU, most of it torch.compile compiling")
    p.add_argument("--shapes", type=_csv, default=None,
                   help=f"comma-separated, from {', '.join(SHAPES)} (default: {', '.join(FULL)})")
    p.add_argument("--losses", type=_csv, default=None,
                   help=f"comma-separated, from {', '.join(LOSSES)} "
                        f"(default: all; --quick: {', '.join(QUICK_LOSSES)})")
    p.add_argument("--providers", type=_csv, default=None,
                   help="comma-separated: reference, compile, pml, floor and our backends "
                        "(default: every one that can run on the device)")
    p.add_argument("--dtypes", type=_csv, default=None,
                   help="comma-separated: float32, bfloat16, float16 "
                        "(default: float32 on CPU, float32,bfloat16 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 7; --quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward+backward calls first")
    p.add_argument("--seconds-per-case", type=float, default=20.0,
                   help="fewer repeats (at least one) where one call is slower than this allows")
    p.add_argument("--max-call-seconds", type=float, default=60.0,
                   help="skip (and record) a run whose forward+backward is estimated, from the "
                        "smaller shapes, to take longer than this")
    _add_threads(p)
    p.add_argument("--interpreter", action="store_true",
                   help="also run the Triton backends through the interpreter on CPU (not a "
                        "performance figure; excluded by default)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"results folder (default: ./{DEFAULT_OUT}, which git ignores)")
    p.add_argument("--tag", default=None, help="suffix of the results file name")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--predict", metavar="GPU", default=None,
                   help="print and write the roofline model's predicted times for GPU (h100, "
                        "h200) instead of measuring: default shapes "
                        f"{', '.join(PROTOCOL_SHAPES)}, all losses, float32 and bfloat16")
    p.add_argument("--roofline", metavar="GPU", default=None,
                   help="the GPU model whose predictions are recorded beside CUDA measurements "
                        "(default: from the device name, when it is an H100 or H200)")
    return p


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: on a machine that other jobs share, "
                        "more threads than free cores make every parallel region wait for a "
                        "descheduled thread; give the core count on a quiet machine)")


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def _choose(names: list[str], known, what: str) -> list[str]:
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)}; expected one of {', '.join(known)}")
    return names


def losses_main(argv: list[str]) -> dict:
    from . import plots, runner
    from .providers import LOSSES, QUICK_LOSSES, all_providers
    from .shapes import FULL, QUICK, SHAPES

    args = _loss_parser().parse_args(argv)
    if args.predict is not None:
        return predict_main(args)
    device = torch.device(args.device)
    _set_threads(args)
    shapes = args.shapes or list(QUICK if args.quick else FULL)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    known_providers = [p.name for p in all_providers()]
    opts = runner.Options(
        device=device,
        shapes=[SHAPES[s] for s in _choose(shapes, SHAPES, "shape")],
        losses=_choose(args.losses or list(QUICK_LOSSES if args.quick else LOSSES), LOSSES,
                       "loss"),
        providers=None if args.providers is None else _choose(
            args.providers, known_providers, "provider"),
        dtypes=[_DTYPES[d] for d in _choose(dtypes, _DTYPES, "dtype")],
        repeats=args.repeats or (3 if args.quick else 7),
        warmup=args.warmup,
        seconds_per_case=args.seconds_per_case,
        max_call_seconds=args.max_call_seconds,
        interpreter=args.interpreter,
        roofline=_roofline_gpu(args.roofline, device),
    )
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    stem = None

    def checkpoint(partial: dict) -> None:
        nonlocal stem
        stem = stem or runner.results_stem(partial["environment"], tag)
        runner.write_results(partial, args.out, stem)

    doc = runner.sweep(opts, checkpoint=checkpoint)
    stem = stem or runner.results_stem(doc["environment"], tag)
    json_path, csv_path = runner.write_results(doc, args.out, stem)
    print(f"wrote {json_path} and {csv_path}")
    if not args.no_plots:
        for path in plots.render(doc, args.out, stem):
            print(f"wrote {path}")
    return doc


def _roofline_gpu(name: str | None, device: torch.device) -> str | None:
    from . import roofline

    if name is not None:
        if name not in roofline.GPUS:
            raise SystemExit(f"unknown GPU model {name!r}; expected one of "
                             f"{', '.join(roofline.GPUS)}")
        return name
    if device.type != "cuda":
        return None
    return roofline.gpu_for_device_name(torch.cuda.get_device_name(device))


def predict_main(args: argparse.Namespace) -> dict:
    """``--predict GPU``: the model's tables alone, printed and written as markdown and JSON."""
    from . import roofline
    from .providers import LOSSES
    from .shapes import SHAPES

    if args.predict not in roofline.GPUS:
        raise SystemExit(f"unknown GPU model {args.predict!r}; expected one of "
                         f"{', '.join(roofline.GPUS)}")
    shapes = [SHAPES[s] for s in _choose(args.shapes or list(PROTOCOL_SHAPES), SHAPES, "shape")]
    losses = _choose(args.losses or list(LOSSES), LOSSES, "loss")
    dtypes = [str(_DTYPES[d]).removeprefix("torch.")
              for d in _choose(args.dtypes or ["float32", "bfloat16"], _DTYPES, "dtype")]
    doc = roofline.predicted_document(args.predict, shapes, losses, dtypes)
    text = roofline.markdown(doc)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"predicted-{args.predict}" + (f"-{args.tag}" if args.tag else "")
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")
    return doc


def metrics_main(argv: list[str]) -> dict:
    from . import metrics_bench, runner

    p = argparse.ArgumentParser(prog="python -m benchmarks metrics",
                                description=metrics_bench.__doc__.split("\n\n")[0])
    p.add_argument("--device", default=_default_device())
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--noise", type=float, default=metrics_bench.NOISE,
                   help="noise norm / class-centre norm of the synthetic embeddings")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    _add_threads(p)
    args = p.parse_args(argv)
    _set_threads(args)
    doc = metrics_bench.run(torch.device(args.device), args.repeats, args.noise)
    stem = runner.results_stem(doc["environment"], "metrics")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    return doc


def plot_main(argv: list[str]) -> None:
    from . import plots

    p = argparse.ArgumentParser(prog="python -m benchmarks plot")
    p.add_argument("results", type=Path, help="a results .json written by python -m benchmarks")
    args = p.parse_args(argv)
    doc = json.loads(args.results.read_text())
    for path in plots.render(doc, args.results.parent, args.results.stem):
        print(f"wrote {path}")


def table_main(argv: list[str]) -> None:
    from . import summary

    p = argparse.ArgumentParser(prog="python -m benchmarks table")
    p.add_argument("results", type=Path, help="a results .json written by python -m benchmarks")
    p.add_argument("--losses", type=_csv, default=None)
    p.add_argument("--shapes", type=_csv, default=None)
    args = p.parse_args(argv)
    print(summary.markdown(json.loads(args.results.read_text()), args.losses, args.shapes))


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    commands = {"metrics": metrics_main, "plot": plot_main, "table": table_main}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return losses_main(argv)


if __name__ == "__main__":
    main()
