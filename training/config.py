"""Experiment configuration: one schema of keys, JSON files that set some, command-line overrides.

A config is a flat dict. Its keys, types, defaults, admitted ranges and help texts are the
``OPTIONS`` table below, the single source for validation and for ``--help``; everything is checked
when the config is built, before any data is read. Precedence, lowest first: the defaults here,
the config file, one ``suite`` entry of that file (a config may hold several experiments, as the
embedded default does), then the command line (``--set key=value`` or ``--key value``), so a
command-line override reaches every experiment of a suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpa_kernels._spec import LOSSES, SIMILARITIES
from mpa_kernels.backends import BACKENDS

DATASETS = ("cub", "cars", "sop", "digits", "synthetic")
BACKBONES = ("bn_inception", "resnet50", "small_cnn", "mlp")


@dataclass(frozen=True)
class Option:
    """One config key: its default (which fixes its type), help text and the values it admits.

    ``at_least``, ``above`` and ``at_most`` bound a number, or each item of a list (``item`` is the
    items' type); ``choices`` lists the admitted values (of each item, for a list). ``resumable``
    keys may differ between a run and its resume because they do not change what the run computes
    (how long, where, how fast, which runs); every other key must match the checkpoint.
    """

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    item: type | None = None
    nonempty: bool = False
    resumable: bool = False

    @property
    def kind(self) -> type:
        return type(self.default)

    @property
    def bounds(self) -> str:
        """The admitted range in words (``> 0``, ``in (0, 1]``); '' when unbounded."""
        low = (f"({self.above}" if self.above is not None
               else f"[{self.at_least}" if self.at_least is not None else None)
        if low is not None and self.at_most is not None:
            return f"in {low}, {self.at_most}]"
        if low is not None:
            return (">" if low[0] == "(" else ">=") + " " + low[1:]
        return f"<= {self.at_most}" if self.at_most is not None else ""

    def admits(self, value: float) -> bool:
        return ((self.above is None or value > self.above)
                and (self.at_least is None or value >= self.at_least)
                and (self.at_most is None or value <= self.at_most))


OPTIONS = (
    Option("name", "experiment", "experiment name; runs go to <out_dir>/<name>/ (a plain folder "
           "name)", resumable=True),
    Option("dataset", "digits", "dataset", DATASETS),
    Option("data_root", "data", "folder holding the dataset in its official layout (see README)",
           resumable=True),
    Option("backbone", "small_cnn", "network before the embedding layer", BACKBONES),
    Option("pretrained", "", "local ImageNet weights of the backbone ('' = random initialisation)",
           resumable=True),
    Option("embedding_size", 512, "embedding dimension (L2-normalised)", at_least=1),
    Option("gem_p", 3.0, "GeM pooling exponent (1 = average pooling, 3 = cubic GeM, the paper's)",
           at_least=1),
    Option("hidden_size", 256, "width of the mlp backbone / channels of the small_cnn",
           at_least=1),
    Option("losses", ["mpa"], "losses to train, one run each", LOSSES, item=str, nonempty=True,
           resumable=True),
    Option("loss_args", {}, "per-loss keyword overrides, e.g. {\"soft_triple\": {\"alpha\": 20}}"),
    Option("proxies_per_class", 10, "K, proxies per class (multi-proxy losses only)", at_least=1),
    Option("alpha", 32.0, "logit scale (SoftTriple's lambda)", above=0),
    Option("delta", 0.1, "margin", at_least=0),
    Option("gamma", 0.1, "temperature of the softmax over a class's K proxies", above=0),
    Option("tau", 0.2, "weight of the proxy regulariser (eq. 3)", at_least=0),
    Option("similarity", "softmax", "class similarity over the K proxies", SIMILARITIES),
    Option("backend", "auto", "mpa_kernels backend", BACKENDS, resumable=True),
    Option("class_parallel", False, "shard the proxies by class over the ranks "
           "(mpa_kernels.parallel.ClassParallelLoss); the network stays data-parallel"),
    Option("lr", 1e-4, "AdamW learning rate of the network", above=0),
    Option("proxy_lr", 1e-2, "AdamW learning rate of the proxies (0 = fixed proxies)",
           at_least=0),
    Option("weight_decay", 1e-4, "AdamW weight decay", at_least=0),
    Option("lr_step", 20, "multiply the learning rates by lr_decay every lr_step epochs",
           at_least=1),
    Option("lr_decay", 0.5, "learning-rate decay factor (1 = constant)", above=0, at_most=1),
    Option("epochs", 60, "training epochs", at_least=1, resumable=True),
    Option("batch_size", 180, "GLOBAL batch size (split over DDP ranks)", at_least=1),
    Option("eval_batch_size", 256, "batch size per rank when embedding the test set", at_least=1,
           resumable=True),
    Option("num_workers", 4, "DataLoader worker processes per rank", at_least=0, resumable=True),
    Option("image_size", 224, "training crop and test centre-crop size", at_least=1),
    Option("resize_size", 256, "test images: shorter side resized to this before the centre crop",
           at_least=1),
    Option("crop_scale_min", 0.08, "RandomResizedCrop lower area bound", above=0, at_most=1),
    Option("hflip", True, "random horizontal flip of training images"),
    Option("recall_ks", [1, 2, 4, 8], "k of the Recall@k columns (the first picks the best epoch)",
           item=int, at_least=1, nonempty=True),
    Option("ndcg_ks", [2, 4, 8], "k of the nDCG@k columns", item=int, at_least=1),
    Option("seed", 0, "seed of the first run", at_least=0, at_most=2**32 - 1, resumable=True),
    Option("seeds", 1, "number of seeds (seed, seed+1, ...) per loss", at_least=1,
           resumable=True),
    Option("out_dir", "runs", "output folder", resumable=True),
    Option("resume", "", "'' = fresh runs, 'auto' = continue each run from its last.pt, "
           "or the last.pt of one run (one loss, one seed, one experiment)", resumable=True),
    Option("device", "auto", "'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...",
           resumable=True),
    Option("amp", True, "bf16 autocast on CUDA (ignored on CPU)", resumable=True),
    Option("compile", False, "torch.compile the network", resumable=True),
    Option("progress", True, "progress bars on a terminal, a plain line every "
           "half minute otherwise", resumable=True),
    Option("threads", 0, "torch CPU threads (0 = torch's default); 1 is fastest for tiny models "
           "on a busy machine", at_least=0, resumable=True),
    Option("synthetic_train_classes", 16, "synthetic set: training classes", at_least=2),
    Option("synthetic_test_classes", 16, "synthetic set: test classes (disjoint from training)",
           at_least=2),
    Option("synthetic_centres", 4, "synthetic set: local centres (Gaussian clusters) per class",
           at_least=1),
    Option("synthetic_samples", 40, "synthetic set: samples per centre", at_least=1),
    Option("synthetic_dim", 32, "synthetic set: input dimension", at_least=2),
    Option("synthetic_spread", 0.35, "synthetic set: std of a cluster around its centre",
           at_least=0),
    Option("suite", [], "experiments run one after another, each a dict of overrides "
           "(with a 'name'); set in config files", item=dict, resumable=True),
    Option("experiments", [], "names of the suite's experiments to run (default: all)", item=str,
           resumable=True),
)
SCHEMA = {o.name: o for o in OPTIONS}
CONFIG_NAMES = ("default", "cub", "cars", "sop")
CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _typed(what: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{what} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    return value


def _check_value(key: str, value: Any) -> Any:
    """``value`` if it has the type of ``key`` and lies in its range; else a ConfigError."""
    if key not in SCHEMA:
        raise ConfigError(f"unknown config key {key!r}; known keys: {sorted(SCHEMA)}")
    opt = SCHEMA[key]
    what = f"config key {key!r}"
    value = _typed(what, value, opt.kind)
    items = [value]
    if opt.kind is list:
        if opt.nonempty and not value:
            raise ConfigError(f"{what} must not be empty")
        what = f"each item of config key {key!r}"
        items = value = [_typed(what, v, opt.item) for v in value] if opt.item else value
        if opt.item is not dict:
            repeated = sorted({v for v in value if value.count(v) > 1}, key=str)
            if repeated:
                raise ConfigError(f"config key {key!r} lists {repeated} more than once")
    for v in items:
        if opt.choices is not None and v not in opt.choices:
            raise ConfigError(f"{what} must be one of {list(opt.choices)}, got {v!r}")
        if opt.bounds and not opt.admits(v):
            raise ConfigError(f"{what} must be {opt.bounds}, got {v!r}")
    return value


def _scalar(text: str) -> Any:
    """A JSON value, or the text itself when it is not JSON (a bare word such as ``mpa``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_value(key: str, text: str) -> Any:
    """A command-line string as the type of ``key``: JSON for numbers, booleans, lists and dicts."""
    kind = SCHEMA[key].kind if key in SCHEMA else str
    if kind is str:
        return text
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key {key!r} must be a boolean, got {text!r}")
    if kind is list and not text.lstrip().startswith("["):
        # ``--losses mpa,proxy_anchor`` and ``--recall-ks 1,10,100``
        return [_scalar(t.strip()) for t in text.split(",") if t.strip()]
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config key {key!r}: cannot parse {text!r} ({err})") from None


def apply_override(cfg: dict, assignment: str) -> None:
    """``key=value``; a dotted key reaches into a dict (``loss_args.soft_triple.alpha=20``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, text = assignment.split("=", 1)
    head, *path = key.strip().split(".")
    if head == "suite":
        raise ConfigError("suite can only be set in a config file; pick its experiments with "
                          "--experiments NAME,...")
    if not path:
        cfg[head] = _check_value(head, parse_value(head, text))
        return
    if head not in SCHEMA or SCHEMA[head].kind is not dict:
        raise ConfigError(f"dotted override {key!r}: {head!r} is not a dict-valued key")
    node = cfg.setdefault(head, {})
    for depth, part in enumerate(path[:-1], start=1):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"dotted override {key!r}: {'.'.join([head, *path[:depth]])} "
                              f"holds {node!r}, not a dict")
    node[path[-1]] = _scalar(text)


def load_file(name_or_path: str) -> tuple[str, dict]:
    """A shipped config by name (``cub``) or a JSON file by path; returns (name, contents)."""
    if name_or_path in CONFIG_NAMES:
        text = (CONFIG_DIR / f"{name_or_path}.json").read_text()
        name = name_or_path
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(
                f"config {name_or_path!r} is neither a shipped config {list(CONFIG_NAMES)} "
                "nor a file"
            )
        text, name = path.read_text(), path.stem
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config {name_or_path!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path!r} must hold a JSON object")
    return name, data


def build(file_values: dict, overrides: list[str] = ()) -> list[dict]:
    """The full config of every experiment in the file (one, or one per ``suite`` entry)."""
    base = {o.name: o.default for o in OPTIONS}
    for key, value in file_values.items():
        base[key] = _check_value(key, value)
    entries = base.pop("suite") or [{}]
    if not all(isinstance(e, dict) for e in entries):
        raise ConfigError("suite must be a list of JSON objects")
    selected = copy.deepcopy(base)
    for assignment in overrides:
        apply_override(selected, assignment)
    if selected["experiments"]:
        names = [e.get("name", base["name"]) for e in entries]
        unknown = sorted(set(selected["experiments"]) - set(names))
        if unknown:
            raise ConfigError(f"no experiment named {unknown} in this config; it has {names}")
        entries = [e for e, n in zip(entries, names) if n in selected["experiments"]]
    configs = []
    for entry in entries:
        cfg = copy.deepcopy(dict(base, suite=[]))
        for key, value in copy.deepcopy(entry).items():
            cfg[key] = _check_value(key, value)
        for assignment in overrides:
            apply_override(cfg, assignment)
        validate(cfg)
        configs.append(cfg)
    names = [c["name"] for c in configs]
    if len(set(names)) < len(names):
        raise ConfigError(f"experiments share a name (and so an output folder): {names}")
    if len(configs) > 1 and configs[0]["resume"] not in ("", "auto"):
        raise ConfigError(f"resume {configs[0]['resume']!r} continues one run, but this config "
                          f"runs the experiments {names}; pick one with --experiments NAME")
    devices = sorted({c["device"] for c in configs})
    if len(devices) > 1:
        raise ConfigError(f"the experiments of one command run on one device, but this config "
                          f"names the devices {devices}")
    return configs


def validate(cfg: dict) -> None:
    """Relations between keys that the per-key checks cannot see."""
    if cfg["resize_size"] < cfg["image_size"]:
        raise ConfigError("resize_size must be >= image_size (the centre crop is cut from it)")
    name = cfg["name"]
    if not name or name in (".", "..") or any(sep in name for sep in "/\\") or \
            Path(name).is_absolute():
        raise ConfigError(f"config key 'name' must be a plain folder name (runs go to "
                          f"<out_dir>/<name>/), got {name!r}")
    if set(cfg["loss_args"]) - set(LOSSES):
        raise ConfigError(f"loss_args keys must be loss names {list(LOSSES)}")
    for loss, args in cfg["loss_args"].items():
        if not isinstance(args, dict):
            raise ConfigError(f"loss_args.{loss} must be a dict of keyword arguments, got "
                              f"{args!r}")
    if (cfg["backbone"] == "mlp") != (cfg["dataset"] == "synthetic"):
        raise ConfigError(f"backbone {cfg['backbone']!r} does not fit dataset "
                          f"{cfg['dataset']!r}: the mlp takes the synthetic vectors, the other "
                          "backbones take images")
    if cfg["backbone"] == "small_cnn" and cfg["hidden_size"] < 4:
        raise ConfigError(f"config key 'hidden_size' must be >= 4 for the small_cnn (its first "
                          f"stage has hidden_size // 4 channels), got {cfg['hidden_size']}")
    if cfg["pretrained"] and cfg["backbone"] not in ("bn_inception", "resnet50"):
        raise ConfigError(f"backbone {cfg['backbone']!r} has no pretrained weights; set "
                          "pretrained=''")
    if cfg["dataset"] == "synthetic" and cfg["synthetic_centres"] * cfg["synthetic_samples"] < 2:
        raise ConfigError("synthetic_centres * synthetic_samples must be >= 2: a class needs two "
                          "samples for a test query to have something to retrieve")
    device = cfg["device"]
    kind, _, index = device.partition(":")
    if not (device in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"config key 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got "
                          f"{device!r}")
    resume = cfg["resume"]
    runs = len(cfg["losses"]) * cfg["seeds"]
    if resume not in ("", "auto") and runs > 1:
        raise ConfigError(f"resume {resume!r} continues one run, but this config has "
                          f"{len(cfg['losses'])} loss(es) x {cfg['seeds']} seed(s) = {runs} runs; "
                          "give one loss and --seeds 1, or --resume auto (each run from its own "
                          "last.pt)")


def check_device(device: str) -> None:
    """Refuse a CUDA device that this torch cannot use (before any CUDA call fails obscurely)."""
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        sees = (f"built with CUDA {torch.version.cuda}, sees no CUDA device" if torch.version.cuda
                else "is a CPU build")
        raise ConfigError(f"config key 'device' is {device!r}, but this torch {torch.__version__} "
                          f"{sees}; use --device cpu or auto")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"config key 'device' is {device!r}, but only "
                          f"{torch.cuda.device_count()} CUDA device(s) are visible")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description="Train and evaluate embedding networks with the mpa_kernels losses. With no "
        "arguments it runs the embedded default (digits and a synthetic multi-centre set, CPU, a "
        "few minutes). Every config key below can be set with --KEY VALUE or --set KEY=VALUE; "
        "lists as JSON or comma-separated, dicts as JSON or dotted keys (--set "
        "loss_args.soft_triple.alpha=20).",
    )
    p.add_argument("--config", default="default",
                   help=f"a shipped config {list(CONFIG_NAMES)} or a path to a JSON config "
                   "(default: default, the embedded CPU demonstration)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="run the experiment once per value of KEY (any config key, e.g. "
                   "proxies_per_class=1,2,4,8; or a JSON list of values) and write a table "
                   "and plot of the metrics against it (see training/sweep.py)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config(s) as JSON and exit")
    keys = p.add_argument_group("config keys (override the config file)")
    for opt in OPTIONS:
        if opt.name == "suite":
            continue
        flag = "--" + opt.name.replace("_", "-")
        extra = f" (one of {list(opt.choices)})" if opt.choices else ""
        if opt.bounds:
            extra += f"; {'each ' if opt.kind is list else ''}{opt.bounds}"
        # Booleans also work as bare switches: ``--compile`` means ``--compile true``.
        switch = {"nargs": "?", "const": "true"} if opt.kind is bool else {}
        keys.add_argument(flag, dest=f"key_{opt.name}", default=None, metavar="VALUE", **switch,
                          help=f"{opt.help}{extra}; default {json.dumps(opt.default)}")
    return p


def from_argv(argv: list[str] | None = None) -> tuple[str, list[dict], argparse.Namespace]:
    """Parse the command line; returns the config name, the experiment configs and the namespace."""
    args = parser().parse_args(argv)
    name, values = load_file(args.config)
    overrides = list(args.set)
    for opt in OPTIONS:
        given = getattr(args, f"key_{opt.name}", None)
        if given is not None:
            overrides.append(f"{opt.name}={given}")
    return name, build(values, overrides), args
