"""One run: a loss and a seed trained with the paper's protocol, evaluated after every epoch.

A run directory holds ``last.pt`` (everything needed to resume exactly: model, proxies, optimiser,
scheduler, the RNG states of every rank and the epoch), ``best.pt`` (the weights of the epoch with
the highest R@1), ``log.csv`` (one row per epoch, rewritten from the checkpoint's history so it
never disagrees with it) and ``result.json``.

Batches are drawn without replacement ("random sampling", as SoftTriple and the paper do) from a
permutation that depends only on (seed, epoch): every rank draws the same global batch and takes its
contiguous slice, and a resumed run draws the same batches an uninterrupted one would.
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler

import mpa_kernels
from mpa_kernels.parallel import ClassParallelLoss
from training import backbones, datasets, distributed, evaluation
from training.config import ConfigError
from training.distributed import Context

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


def make_loss(cfg: dict, name: str, num_classes: int) -> nn.Module:
    """The loss ``name`` with the config's hyper-parameters that it accepts, then ``loss_args``;
    with ``class_parallel``, its class-parallel form over the default process group."""
    cls = LOSSES[name]
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: cfg[k] for k in _SHARED_ARGS if k in accepted}
    extra = cfg["loss_args"].get(name, {})
    unknown = [k for k in extra if k not in accepted]
    if unknown:
        raise ConfigError(f"loss_args.{name}: {unknown} are not arguments of {cls.__name__}")
    kwargs.update(extra)
    if cfg["class_parallel"]:
        return ClassParallelLoss(cls, num_classes, cfg["embedding_size"], **kwargs)
    return cls(num_classes=num_classes, embedding_size=cfg["embedding_size"], **kwargs)


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Run:
    """Build everything for one (loss, seed); :meth:`fit` trains, evaluates and checkpoints."""

    def __init__(self, cfg: dict, loss: str, seed: int, run_dir: Path, ctx: Context):
        self.cfg, self.loss_name, self.seed, self.dir, self.ctx = cfg, loss, seed, run_dir, ctx
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
            state.pop("criterion._extra_state")
            state["criterion.proxies"] = self.model.criterion.full_proxies()
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

    def load(self, path: Path) -> None:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt["loss"] != self.loss_name:
            raise ConfigError(f"{path} is a {ckpt['loss']} checkpoint, not {self.loss_name}")
        if len(ckpt["rng"]) != self.ctx.world_size:
            raise ConfigError(f"{path} was written by {len(ckpt['rng'])} ranks; resume it with "
                              "the same number")
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

    def _save(self) -> None:
        rng = distributed.gather_objects(_rng_state(), self.ctx)
        model, optimizer = self.model_state(), self.optimizer_state()
        if self.ctx.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            _atomic_save(self.state(rng, model, optimizer), self.dir / "last.pt")
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

    def _progress(self, iterable, desc: str):
        if not (self.cfg["progress"] and self.ctx.is_main):
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)

    def train_epoch(self) -> float:
        self.train_model.train()
        self.sampler.epoch = self.epoch
        loader = self._loader(self.splits.train, batch_sampler=self.sampler)
        total, steps = torch.zeros((), device=self.ctx.device), 0
        desc = f"{DISPLAY_NAMES[self.loss_name]} seed {self.seed} epoch {self.epoch + 1}"
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
        resume = cfg["resume"]
        path = self.dir / "last.pt" if resume == "auto" else Path(resume) if resume else None
        if path is not None and path.is_file():
            self.load(path)
        elif resume and resume != "auto":
            raise FileNotFoundError(f"resume checkpoint {resume} not found")
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
                    _atomic_save({"model": model, "epoch": self.epoch,
                                  "metrics": scores, "config": cfg}, self.dir / "best.pt")
            self._save()
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
