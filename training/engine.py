"""One run: a loss and a seed trained with the paper's protocol, evaluated after every epoch.

A run directory holds ``last.pt`` (everything needed to resume exactly: model, proxies, optimiser,
scheduler, the RNG states of every rank and the epoch), ``best.pt`` (the weights of the epoch with
the highest R@1), ``log.csv`` (one row per epoch, rewritten from the checkpoint's history so it
never disagrees with it) and ``result.json``. Both checkpoints are written atomically, with a header
that says which kind they are and a SHA-256 of their contents; :func:`load_checkpoint` refuses any
other file with a message that names it and what is wrong.

Batches are drawn without replacement ("random sampling", as SoftTriple and the paper do) from a
permutation that depends only on (seed, epoch): every rank draws the same global batch and takes its
contiguous slice, and a resumed run draws the same batches an uninterrupted one would.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

import mpa_kernels
from mpa_kernels.backends import BackendUnavailableError
from mpa_kernels.parallel import ClassParallelLoss
from . import backbones, config, datasets, distributed, evaluation
from .config import ConfigError
from .distributed import Context

LOSSES = {
    "mpa": mpa_kernels.MPALoss,
    "mpa_dw": mpa_kernels.MPADWLoss,
    "mpa_ap": mpa_kernels.MPAAPLoss,
    "soft_triple": mpa_kernels.SoftTripleLoss,
    "proxy_anchor": mpa_kernels.ProxyAnchorLoss,
    "proxy_nca": mpa_kernels.ProxyNCALoss,
}
DISPLAY_NAMES = {"mpa": "MPA", "mpa_dw": "MPA-DW", "mpa_ap": "MPA-AP", "soft_triple": "SoftTriple",
                 "proxy_anchor": "ProxyAnchor", "proxy_nca": "ProxyNCA"}
_SHARED_ARGS = ("proxies_per_class", "alpha", "delta", "gamma", "tau", "similarity", "backend")
# Keys that pick which runs a command makes, not how a run trains.
_SELECTION = ("losses", "seed", "seeds", "experiments", "suite", "resume")


def loss_kwargs(cfg: dict, name: str) -> dict:
    """The config's hyper-parameters that loss ``name`` accepts, then its ``loss_args``."""
    accepted = inspect.signature(LOSSES[name].__init__).parameters
    kwargs = {k: cfg[k] for k in _SHARED_ARGS if k in accepted}
    extra = cfg["loss_args"].get(name, {})
    unknown = [k for k in extra if k not in accepted]
    if unknown:
        raise ConfigError(f"loss_args.{name}: {unknown} are not arguments of "
                          f"{LOSSES[name].__name__}")
    return dict(kwargs, **extra)


def make_loss(cfg: dict, name: str, num_classes: int) -> nn.Module:
    """The loss ``name`` with :func:`loss_kwargs`; with ``class_parallel``, its class-parallel
    form over the default process group."""
    if cfg["class_parallel"]:
        return ClassParallelLoss(LOSSES[name], num_classes, cfg["embedding_size"],
                                 **loss_kwargs(cfg, name))
    return LOSSES[name](num_classes=num_classes, embedding_size=cfg["embedding_size"],
                        **loss_kwargs(cfg, name))


def check_loss(cfg: dict, name: str, device: torch.device, world_size: int = 1) -> None:
    """Build loss ``name`` and take one step of it on a tiny batch, so that a bad loss argument
    or a backend that cannot run here is refused before any data is read. With class-parallel
    proxies every rank must take part (the step is collective) and own at least one class."""
    classes = max(2, world_size)
    try:
        with torch.random.fork_rng(devices=[]):
            criterion = make_loss(cfg, name, num_classes=classes).to(device)
            x = torch.randn(4, cfg["embedding_size"]).to(device).requires_grad_()
            criterion(x, (torch.arange(4) % classes).to(device)).backward()
    except ConfigError:
        raise
    except (TypeError, ValueError, BackendUnavailableError) as err:
        raise ConfigError(f"loss {name!r}: {err}") from None


class LossModel(nn.Module):
    """Network and loss in one module, so DDP averages the proxies' gradients with the weights'."""

    def __init__(self, net: nn.Module, criterion: nn.Module, ctx: Context):
        super().__init__()
        self.net, self.criterion, self.ctx = net, criterion, ctx

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(self.criterion, ClassParallelLoss):  # it gathers the batch itself
            return self.criterion(self.net(x), labels)
        embeddings = distributed.gather_with_grad(self.net(x), self.ctx)
        return self.criterion(embeddings, distributed.gather(labels, self.ctx))


class GlobalBatchSampler(Sampler):
    """This rank's slice of each global batch of a (seed, epoch)-determined permutation."""

    def __init__(self, size: int, batch_size: int, ctx: Context, seed: int):
        if batch_size % ctx.world_size:
            raise ConfigError(f"batch_size {batch_size} (global) is not divisible by the "
                              f"{ctx.world_size} ranks")
        if size < batch_size:
            raise ConfigError(f"batch_size {batch_size} exceeds the {size} training samples")
        self.size, self.batch_size, self.ctx, self.seed = size, batch_size, ctx, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.size // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.size, generator=epoch_generator(self.seed, self.epoch, 0))
        local = self.batch_size // self.ctx.world_size
        for step in range(len(self)):
            start = step * self.batch_size + self.ctx.rank * local
            yield order[start:start + local].tolist()


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A generator fixed by (seed, epoch, stream): the same on every rank and after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 2 * epoch + stream)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    # numpy's key array travels as a tensor, so that checkpoints load with weights_only=True.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints -------------------------------------------------------------------------------
# torch.load does not check the zip's CRCs, so flipped bytes in a tensor load silently; each
# checkpoint therefore carries a SHA-256 of its whole contents, and a header that says what it is.
CHECKPOINT_FORMAT = "mpa-kernels training checkpoint"
CHECKPOINT_KINDS = {"last": "everything needed to resume a run",
                    "best": "the weights of a run's best epoch only"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, corrupted, of the wrong kind or of another run."""


def _digest(obj, h) -> None:
    """Feed ``obj`` (nested dicts, lists and tuples of tensors, numbers and strings) into ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)}\n".encode())
        for key, value in obj.items():
            _digest(key, h)
            _digest(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__} {len(obj)}\n".encode())
        for value in obj:
            _digest(value, h)
    else:
        text = repr(obj)
        h.update(f"{type(obj).__name__} {len(text)} {text}\n".encode())


def _sha256(obj) -> str:
    h = hashlib.sha256()
    _digest(obj, h)
    return h.hexdigest()


def save_checkpoint(contents: dict, path: Path, kind: str) -> None:
    """``contents`` with a header and checksum, written atomically: a crash mid-write leaves the
    previous file in place, never a truncated one."""
    ckpt = {"format": CHECKPOINT_FORMAT, "kind": kind, **contents}
    ckpt["sha256"] = _sha256(ckpt)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(ckpt, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path | str, kind: str) -> dict:
    """A checkpoint of ``kind`` ('last' or 'best') that this harness wrote and that is intact; any
    other file gets a :class:`CheckpointError` that names it and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        looks = " (it looks like JSON)" if head.lstrip()[:1] in (b"{", b"[") else ""
        raise CheckpointError(f"{path} is not a checkpoint: a torch.save file is a zip archive, "
                              f"this one starts with {head!r}{looks}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or damaged): "
                              f"{type(err).__name__}: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was not written by python -m training (it lacks the "
                              f"{CHECKPOINT_FORMAT!r} header): a weights file, another "
                              "program's checkpoint, or one from before checksums")
    found = ckpt.get("kind")
    if found != kind:
        raise CheckpointError(
            f"{path} is a {found}.pt checkpoint ({CHECKPOINT_KINDS.get(found)}), not a {kind}.pt "
            f"({CHECKPOINT_KINDS[kind]})"
            + ("; resume from the last.pt beside it" if kind == "last" else ""))
    saved = ckpt.pop("sha256", None)
    if saved != _sha256(ckpt):
        raise CheckpointError(f"checkpoint {path} is corrupted: its contents do not match the "
                              "SHA-256 saved with it")
    return ckpt


def _settings(cfg: dict, loss: str) -> dict:
    """What a run of ``loss`` trains with: every key that is not resumable, with the loss's own
    arguments in place of the loss keys (so a change to another loss's arguments does not count)."""
    full = {**{o.name: o.default for o in config.OPTIONS}, **cfg}
    loss_keys = (*_SHARED_ARGS, "loss_args")
    settings = {k: full[k] for k, opt in config.SCHEMA.items()
                if not opt.resumable and k not in loss_keys}
    for k, v in loss_kwargs(full, loss).items():
        if not (k in config.SCHEMA and config.SCHEMA[k].resumable):
            settings[f"{k} of {loss}"] = v
    return settings


def _changes(saved: dict, now: dict) -> list[str]:
    return [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in dict.fromkeys([*saved, *now])
            if saved.get(k) != now.get(k)]


def run_dir(cfg: dict, loss: str, seed: int) -> Path:
    return Path(cfg["out_dir"]) / cfg["name"] / loss / f"seed{seed}"


def runs(cfg: dict):
    """(loss, seed, run directory) of every run of an experiment."""
    for loss in cfg["losses"]:
        for seed in range(cfg["seed"], cfg["seed"] + cfg["seeds"]):
            yield loss, seed, run_dir(cfg, loss, seed)


def resume_checkpoint(cfg: dict, loss: str, seed: int, directory: Path,
                      ctx: Context) -> tuple[Path, dict] | None:
    """The checkpoint a run continues from, verified to be this run's and trained with this
    config's settings; None for a fresh run. A resumed run must train exactly what the saved
    one did, so a changed setting is refused (with the keys that differ), not half-applied."""
    if not cfg["resume"]:
        return None
    path = directory / "last.pt" if cfg["resume"] == "auto" else Path(cfg["resume"])
    if cfg["resume"] == "auto" and not path.exists():
        return None
    ckpt = load_checkpoint(path, "last")
    if (ckpt["loss"], ckpt["seed"]) != (loss, seed):
        raise CheckpointError(f"{path} is the checkpoint of {ckpt['loss']} seed {ckpt['seed']}, "
                              f"but this run is {loss} seed {seed}")
    if len(ckpt["rng"]) != ctx.world_size:
        raise CheckpointError(f"{path} was written by {len(ckpt['rng'])} rank(s); resume it with "
                              f"the same number, not {ctx.world_size}")
    changed = _changes(_settings(ckpt["config"], loss), _settings(cfg, loss))
    if changed:
        raise CheckpointError(
            f"{path} was trained with other settings ({'; '.join(changed)}); a resumed run "
            "continues the saved one exactly, so resume with the saved values, or start a fresh "
            "run (another --name or --out-dir)")
    return path, ckpt


def check_network(cfg: dict) -> None:
    """The network embeds one input of the configured shape (on the CPU, random weights): an
    image size that a backbone's pooling cannot take is refused before any data is read."""
    vectors = cfg["dataset"] == "synthetic"
    size = cfg["image_size"]
    shape = (2, cfg["synthetic_dim"]) if vectors else (2, 3, size, size)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the random-initialisation note: said by the CLI
        net = backbones.build(dict(cfg, pretrained=""), input_dim=shape[1] if vectors else None)
        try:
            net.eval()(torch.zeros(shape))
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0]
            raise ConfigError(f"backbone {cfg['backbone']!r} cannot take a {size}x{size} image "
                              f"(config key 'image_size'): {reason}") from None


def check_experiment(cfg: dict, ctx: Context) -> None:
    """What can be checked of an experiment before its data is read: the losses run here with
    their arguments, the pretrained weights exist, and every checkpoint a run would resume from
    is intact, that run's, and trained with the same settings."""
    for loss in cfg["losses"]:
        check_loss(cfg, loss, ctx.device, ctx.world_size)
    if cfg["pretrained"] and not Path(cfg["pretrained"]).is_file():
        raise ConfigError(f"config key 'pretrained': no file {cfg['pretrained']}")
    check_network(cfg)
    for loss, seed, directory in runs(cfg):
        resume_checkpoint(cfg, loss, seed, directory, ctx)


PROGRESS_SECONDS = 30.0


def _periodic(iterable, desc: str, every: float):
    """``iterable``, printing a plain progress line whenever ``every`` seconds have passed."""
    start = last = time.perf_counter()
    for step, item in enumerate(iterable, start=1):
        yield item
        now = time.perf_counter()
        if now - last >= every:
            print(f"{desc}: batch {step}/{len(iterable)}, {now - start:.0f} s", file=sys.stderr,
                  flush=True)
            last = now


class Run:
    """Build everything for one (loss, seed); :meth:`fit` trains, evaluates and checkpoints."""

    def __init__(self, cfg: dict, loss: str, seed: int, run_dir: Path, ctx: Context):
        self.cfg, self.loss_name, self.seed, self.dir, self.ctx = cfg, loss, seed, run_dir, ctx
        # Before the data: a bad checkpoint or changed settings must not wait for a dataset load.
        self.resume_from = resume_checkpoint(cfg, loss, seed, run_dir, ctx)
        self.splits = datasets.load(cfg)
        self.sampler = GlobalBatchSampler(len(self.splits.train), cfg["batch_size"], ctx, seed)
        sample = self.splits.train[0][0]
        # Same seed on every rank for the initialisation (DDP also broadcasts rank 0's weights).
        _seed_all(seed)
        net = backbones.build(cfg, input_dim=sample.shape[-1] if sample.dim() == 1 else None)
        criterion = make_loss(cfg, loss, self.splits.num_train_classes)
        self.model = LossModel(net, criterion, ctx).to(ctx.device)
        if cfg["compile"]:
            self.model.net.compile()
        self.optimizer = torch.optim.AdamW(
            [{"params": net.parameters(), "lr": cfg["lr"]},
             {"params": criterion.parameters(), "lr": cfg["proxy_lr"]}],
            weight_decay=cfg["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg["lr_step"],
                                                         cfg["lr_decay"])
        self.class_parallel = cfg["class_parallel"]
        if ctx.distributed and self.class_parallel:
            self.train_model = distributed.class_parallel_model(self.model, ctx)
        elif ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.train_model = self.model
        # Augmentation streams differ between ranks.
        _seed_all(seed * 1000 + ctx.rank + 1)
        self.epoch, self.history, self.best = 0, [], None
        self.autocast = ctx.device.type == "cuda" and cfg["amp"]

    # -- checkpoints ---------------------------------------------------------------------------
    def model_state(self) -> dict:
        """The model's state dict with all C*K proxies (class-parallel: gathered from every rank,
        so a collective), loadable by any number of ranks and by the single-process loss."""
        state = self.model.state_dict()
        if self.class_parallel:
            full = self.model.criterion.full_state_dict()
            state.update({"criterion." + key: value for key, value in full.items()})
        return state

    def optimizer_state(self):
        """The optimiser state; class-parallel: every rank's (a collective), as each holds the
        state of its own proxies."""
        state = self.optimizer.state_dict()
        return distributed.gather_objects(state, self.ctx) if self.class_parallel else state

    def state(self, rng_states: list, model_state: dict, optimizer_state) -> dict:
        return {"epoch": self.epoch, "model": model_state,
                "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                "rng": rng_states, "history": self.history, "best": self.best,
                "loss": self.loss_name, "seed": self.seed, "config": self.cfg}

    def restore(self, path: Path, ckpt: dict) -> None:
        """Continue from a checkpoint that :func:`resume_checkpoint` accepted (loaded on the CPU:
        RNG states must stay CPU tensors; load_state_dict moves the rest)."""
        self.model.load_state_dict(ckpt["model"])
        optimizer = ckpt["optimizer"]
        if isinstance(optimizer, list) != self.class_parallel:
            raise ConfigError(f"{path} was written with class_parallel={not self.class_parallel}; "
                              "resume it the same way")
        self.optimizer.load_state_dict(optimizer[self.ctx.rank] if self.class_parallel
                                       else optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"][self.ctx.rank])
        self.epoch, self.history, self.best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        if self.ctx.is_main:
            # The resumable keys that changed, less those that only pick which runs happen.
            keys = [k for k, o in config.SCHEMA.items() if o.resumable and k not in _SELECTION]
            moved = _changes({k: ckpt["config"].get(k) for k in keys},
                             {k: self.cfg[k] for k in keys})
            print(f"{self._desc()}: resuming {path} after epoch {self.epoch}"
                  + (f" ({'; '.join(moved)})" if moved else ""), flush=True)

    def _save(self) -> None:
        rng = distributed.gather_objects(_rng_state(), self.ctx)
        model, optimizer = self.model_state(), self.optimizer_state()
        if self.ctx.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.state(rng, model, optimizer), self.dir / "last.pt", "last")
            self._write_log()
        distributed.barrier(self.ctx)

    def _write_log(self) -> None:
        fields = list(self.history[0])
        with open(self.dir / "log.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.history)

    # -- training ------------------------------------------------------------------------------
    def _loader(self, dataset, **kwargs) -> DataLoader:
        # The generator fixes the worker seeds, so augmentations in workers are reproducible too.
        return DataLoader(dataset, num_workers=self.cfg["num_workers"],
                          generator=epoch_generator(self.seed, self.epoch, 1),
                          pin_memory=self.ctx.device.type == "cuda", **kwargs)

    def _desc(self) -> str:
        return f"{DISPLAY_NAMES[self.loss_name]} seed {self.seed}"

    def _plain_progress(self) -> bool:
        """Plain lines instead of progress bars: a redirected log would fill with the bars'
        carriage returns."""
        return self.cfg["progress"] and self.ctx.is_main and not sys.stderr.isatty()

    def _progress(self, iterable, desc: str):
        if not (self.cfg["progress"] and self.ctx.is_main):
            return iterable
        if self._plain_progress():
            return _periodic(iterable, desc, PROGRESS_SECONDS)
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)

    def train_epoch(self) -> float:
        self.train_model.train()
        self.sampler.epoch = self.epoch
        loader = self._loader(self.splits.train, batch_sampler=self.sampler)
        total, steps = torch.zeros((), device=self.ctx.device), 0
        desc = f"{self._desc()} epoch {self.epoch + 1}"
        for x, y in self._progress(loader, desc):
            x = x.to(self.ctx.device, non_blocking=True)
            y = y.to(self.ctx.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                loss = self.train_model(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach()  # no host sync per step
            steps += 1
        self.scheduler.step()
        return total.item() / max(steps, 1)

    @torch.no_grad()
    def embed(self, dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of ``dataset``, each rank embedding a contiguous shard, gathered on all."""
        n, world, rank = len(dataset), self.ctx.world_size, self.ctx.rank
        shard = range(rank * n // world, (rank + 1) * n // world)
        loader = self._loader(torch.utils.data.Subset(dataset, shard),
                              batch_size=self.cfg["eval_batch_size"], shuffle=False)
        net = self.model.net
        net.eval()
        out, labels = [], []
        for x, y in loader:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                out.append(net(x.to(self.ctx.device)).float())
            labels.append(y.to(self.ctx.device))
        emb = torch.cat(out) if out else torch.empty(0, self.cfg["embedding_size"],
                                                     device=self.ctx.device)
        lab = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long,
                                                           device=self.ctx.device)
        return distributed.gather(emb, self.ctx), distributed.gather(lab, self.ctx)

    def evaluate(self) -> dict[str, float]:
        emb, labels = self.embed(self.splits.test)
        return evaluation.evaluate(emb, labels, self.cfg["recall_ks"], self.cfg["ndcg_ks"])

    def fit(self) -> dict | None:
        """Train to ``epochs`` (from the checkpoint's epoch when resuming); the result on rank 0."""
        cfg, start = self.cfg, time.perf_counter()
        if self.resume_from is not None:
            self.restore(*self.resume_from)
            self.resume_from = None  # the checkpoint's tensors are not needed twice
        writer = self._tensorboard()
        first_metric = f"R@{cfg['recall_ks'][0]}"
        while self.epoch < cfg["epochs"]:
            t0 = time.perf_counter()
            lrs = [group["lr"] for group in self.optimizer.param_groups]
            train_loss = self.train_epoch()
            scores = self.evaluate()
            self.epoch += 1
            row = {"epoch": self.epoch, "train_loss": train_loss, "lr": lrs[0],
                   "proxy_lr": lrs[1], **scores, "seconds": time.perf_counter() - t0}
            self.history.append(row)
            if self.best is None or scores[first_metric] > self.best[first_metric]:
                self.best = dict(scores, epoch=self.epoch)
                model = self.model_state()  # every rank: gathering the proxies is a collective
                if self.ctx.is_main:
                    self.dir.mkdir(parents=True, exist_ok=True)
                    save_checkpoint({"model": model, "epoch": self.epoch,
                                     "metrics": scores, "config": cfg}, self.dir / "best.pt",
                                    "best")
            self._save()
            if self._plain_progress():
                print(f"{self._desc()} epoch {self.epoch}/{cfg['epochs']}: train loss "
                      f"{train_loss:.4f}, {first_metric} {scores[first_metric]:.1f} "
                      f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch":
                        writer.add_scalar(key, value, self.epoch)
        if writer is not None:
            writer.close()
        if not self.ctx.is_main:
            return None
        result = {"loss": self.loss_name, "seed": self.seed, "best": self.best,
                  "history": self.history, "seconds": time.perf_counter() - start}
        (self.dir / "result.json").write_text(json.dumps(result, indent=1))
        return result

    def _tensorboard(self):
        if not self.ctx.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional; log.csv always exists
            return None
        return SummaryWriter(str(self.dir / "tensorboard"))
