"""Experiment configuration: one schema of keys, JSON files that set some, command-line overrides.

A config is a flat dict. Its keys, types, defaults and help texts are the ``OPTIONS`` table below,
the single source for validation and for ``--help``. Precedence, lowest first: the defaults here,
the config file, one ``suite`` entry of that file (a config may hold several experiments, as the
embedded default does), then the command line (``--set key=value`` or ``--key value``), so a
command-line override reaches every experiment of a suite.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpa_kernels._spec import LOSSES, SIMILARITIES
from mpa_kernels.backends import BACKENDS

DATASETS = ("cub", "cars", "sop", "digits", "synthetic")
BACKBONES = ("bn_inception", "resnet50", "small_cnn", "mlp")


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    help: str
    choices: tuple | None = None

    @property
    def kind(self) -> type:
        return type(self.default)


OPTIONS = (
    Option("name", "experiment", "experiment name; runs go to <out_dir>/<name>/"),
    Option("dataset", "digits", "dataset", DATASETS),
    Option("data_root", "data", "folder holding the dataset in its official layout (see README)"),
    Option("backbone", "small_cnn", "network before the embedding layer", BACKBONES),
    Option("pretrained", "", "local ImageNet weights of the backbone ('' = random initialisation)"),
    Option("embedding_size", 512, "embedding dimension (L2-normalised)"),
    Option("gem_p", 3.0, "GeM pooling exponent (3 = cubic GeM, the paper's)"),
    Option("hidden_size", 256, "width of the mlp backbone / channels of the small_cnn"),
    Option("losses", ["mpa"], f"losses to train, one run each; any of {list(LOSSES)}"),
    Option("loss_args", {}, "per-loss keyword overrides, e.g. {\"soft_triple\": {\"alpha\": 20}}"),
    Option("proxies_per_class", 10, "K, proxies per class (multi-proxy losses only)"),
    Option("alpha", 32.0, "logit scale (SoftTriple's lambda)"),
    Option("delta", 0.1, "margin"),
    Option("gamma", 0.1, "temperature of the softmax over a class's K proxies"),
    Option("tau", 0.2, "weight of the proxy regulariser (eq. 3)"),
    Option("similarity", "softmax", "class similarity over the K proxies", SIMILARITIES),
    Option("backend", "auto", "mpa_kernels backend", BACKENDS),
    Option("class_parallel", False, "shard the proxies by class over the ranks "
           "(mpa_kernels.parallel.ClassParallelLoss); the network stays data-parallel"),
    Option("lr", 1e-4, "AdamW learning rate of the network"),
    Option("proxy_lr", 1e-2, "AdamW learning rate of the proxies"),
    Option("weight_decay", 1e-4, "AdamW weight decay"),
    Option("lr_step", 20, "multiply the learning rates by lr_decay every lr_step epochs"),
    Option("lr_decay", 0.5, "learning-rate decay factor"),
    Option("epochs", 60, "training epochs"),
    Option("batch_size", 180, "GLOBAL batch size (split over DDP ranks)"),
    Option("eval_batch_size", 256, "batch size per rank when embedding the test set"),
    Option("num_workers", 4, "DataLoader worker processes per rank"),
    Option("image_size", 224, "training crop and test centre-crop size"),
    Option("resize_size", 256, "test images: shorter side resized to this before the centre crop"),
    Option("crop_scale_min", 0.08, "RandomResizedCrop lower area bound"),
    Option("hflip", True, "random horizontal flip of training images"),
    Option("recall_ks", [1, 2, 4, 8], "k of the Recall@k columns"),
    Option("ndcg_ks", [2, 4, 8], "k of the nDCG@k columns"),
    Option("seed", 0, "seed of the first run"),
    Option("seeds", 1, "number of seeds (seed, seed+1, ...) per loss"),
    Option("out_dir", "runs", "output folder"),
    Option("resume", "", "'' = fresh runs, 'auto' = continue each run from its last.pt, "
           "or a checkpoint path (single run only)"),
    Option("device", "auto", "'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."),
    Option("amp", True, "bf16 autocast on CUDA (ignored on CPU)"),
    Option("compile", False, "torch.compile the network"),
    Option("progress", True, "tqdm progress bars"),
    Option("threads", 0, "torch CPU threads (0 = torch's default); 1 is fastest for tiny models "
           "on a busy machine"),
    Option("synthetic_train_classes", 16, "synthetic set: training classes"),
    Option("synthetic_test_classes", 16, "synthetic set: test classes (disjoint from training)"),
    Option("synthetic_centres", 4, "synthetic set: local centres (Gaussian clusters) per class"),
    Option("synthetic_samples", 40, "synthetic set: samples per centre"),
    Option("synthetic_dim", 32, "synthetic set: input dimension"),
    Option("synthetic_spread", 0.35, "synthetic set: std of a cluster around its centre"),
    Option("suite", [], "experiments run one after another, each a dict of overrides "
           "(with a 'name'); set in config files"),
    Option("experiments", [], "names of the suite's experiments to run (default: all)"),
)
SCHEMA = {o.name: o for o in OPTIONS}
CONFIG_NAMES = ("default", "cub", "cars", "sop")
CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _check_value(key: str, value: Any) -> Any:
    if key not in SCHEMA:
        raise ConfigError(f"unknown config key {key!r}; known keys: {sorted(SCHEMA)}")
    opt = SCHEMA[key]
    kind = opt.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r} must be {kind.__name__}, got {value!r}")
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"config key {key!r} must be one of {list(opt.choices)}, got {value!r}")
    if key == "losses":
        bad = [name for name in value if name not in LOSSES]
        if bad or not value:
            raise ConfigError(f"losses must be a non-empty list of {list(LOSSES)}, got {value!r}")
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
    for part in path[:-1]:
        node = node.setdefault(part, {})
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
    return configs


def validate(cfg: dict) -> None:
    """Relations between keys that the per-key checks cannot see."""
    for key in ("embedding_size", "epochs", "batch_size", "eval_batch_size", "seeds", "lr_step",
                "proxies_per_class", "image_size", "resize_size"):
        if cfg[key] < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {cfg[key]}")
    if cfg["num_workers"] < 0 or cfg["threads"] < 0:
        raise ConfigError("num_workers and threads must be >= 0")
    if cfg["resize_size"] < cfg["image_size"]:
        raise ConfigError("resize_size must be >= image_size (the centre crop is cut from it)")
    if set(cfg["loss_args"]) - set(LOSSES):
        raise ConfigError(f"loss_args keys must be loss names {list(LOSSES)}")


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
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config(s) as JSON and exit")
    keys = p.add_argument_group("config keys (override the config file)")
    for opt in OPTIONS:
        if opt.name == "suite":
            continue
        flag = "--" + opt.name.replace("_", "-")
        extra = f" (one of {list(opt.choices)})" if opt.choices else ""
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
