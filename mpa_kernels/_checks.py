"""Input checks shared by every loss and backend.

The structural checks (types, ranks, shapes, devices) cost nothing and always run. The value checks
(labels in range; rows of embeddings and proxies finite, not zero, their norms not overflowing) read
the data. In eager mode on the CPU they run on the host (reading a CPU tensor costs no
synchronisation) and raise a ``ValueError`` that names the row. Elsewhere (CUDA, and any device
while ``torch.compile`` traces) they are device-side assertions that never stall the stream
(:func:`assert_values_async`): the label range, and every row's norm finite and above
:data:`NORM_EPS`. A failed device-side assertion surfaces at the next synchronisation as a
``RuntimeError`` carrying the message. ``validate=False`` turns the value checks off. Without them
a kernel would read out of bounds or return NaN, so they are on by default.
"""

from __future__ import annotations

import math

import torch


# Rows at most this long are "zero": normalising them (as F.normalize does) divides by this instead
# of their norm, so the row does not become a unit vector and its gradient is scaled by 1/NORM_EPS.
NORM_EPS = 1e-12


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``, from two reductions (max and min propagate NaN and keep
    infinities) and one host sync, without ``isfinite``'s tensor-sized temporaries (the proxies
    can be gigabytes)."""
    return bool(torch.isfinite(torch.stack([t.amax(), t.amin()])).all())


def check_row_norms(t: torch.Tensor, name: str, norms: torch.Tensor | None = None) -> None:
    """Every row of ``t`` has a finite L2 norm above :data:`NORM_EPS`, i.e. a direction that
    normalisation can find: no NaN or infinity, no row of zeros (whose cosine similarity is
    undefined and whose gradient would be about ``1 / NORM_EPS``), no row whose norm overflows
    ``t``'s dtype (it would normalise to zeros). The losses and the metrics share it, so one input
    gets one answer everywhere.

    One pass over ``t`` (its row norms, unless given as ``norms``) and one host sync; the slower
    diagnosis runs only when a row fails.
    """
    if norms is None:
        norms = torch.linalg.vector_norm(t, dim=1)
    lo, hi = torch.stack([norms.amin(), norms.amax()]).tolist()
    if not math.isfinite(hi):
        if not all_finite(t):
            raise ValueError(f"{name} contain NaN or infinite values")
        row = int(norms.reshape(-1).isinf().nonzero()[0])
        raise ValueError(
            f"{name} row {row} has an L2 norm that overflows {t.dtype}: scale it down"
        )
    if lo <= NORM_EPS:
        row = int(norms.reshape(-1).argmin())
        raise ValueError(
            f"{name} has a row of zeros (row {row}: L2 norm {lo:.3g}, at most {NORM_EPS:g}); it "
            "has no direction, so its cosine similarity is undefined"
        )


def check_embeddings_and_labels(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    validate: bool = True,
    names: tuple[str, str] = ("embeddings", "labels"),
) -> None:
    """Structure of an ``(N, d)`` float tensor and its ``(N,)`` integer labels; with ``validate``,
    also that the embeddings are finite. Used by the losses and by the metrics."""
    name, labels_name = names
    for arg, t in ((name, embeddings), (labels_name, labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"{name} must have shape (N, d), got {tuple(embeddings.shape)}")
    if labels.dim() != 1:
        raise ValueError(f"{labels_name} must have shape (N,), got {tuple(labels.shape)}")
    if not embeddings.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {embeddings.dtype}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{labels_name} must be an integer tensor, got {labels.dtype}")
    if embeddings.shape[0] == 0:
        raise ValueError(f"empty batch: {name} has no rows")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{name} has embedding size 0")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{name} has {embeddings.shape[0]} rows but {labels_name} has {labels.shape[0]} entries"
        )
    if validate:
        check_row_norms(embeddings, name)


def check_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxies_per_class: int,
    validate: bool = True,
) -> int:
    """Check the tensors of one loss call; return the number of classes ``C``."""
    check_embeddings_and_labels(embeddings, labels, validate)
    num_classes = check_proxies(proxies, proxies_per_class, validate=False)
    if embeddings.shape[1] != proxies.shape[1]:
        raise ValueError(
            f"embedding size {embeddings.shape[1]} differs from the proxies' {proxies.shape[1]}"
        )
    if embeddings.device != proxies.device or embeddings.device != labels.device:
        raise ValueError(
            "embeddings, labels and proxies must be on one device, got "
            f"{embeddings.device}, {labels.device} and {proxies.device}"
        )
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if validate:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]"
            )
        check_row_norms(proxies, "proxies")
    return num_classes


def check_proxies(proxies: torch.Tensor, proxies_per_class: int, validate: bool = True) -> int:
    """Check ``(C * K, d)`` proxies (with ``validate``, their values too); return ``C``.

    Used by the losses and by the proxy regulariser on its own.
    """
    if not isinstance(proxies, torch.Tensor):
        raise TypeError(f"proxies must be a torch.Tensor, got {type(proxies).__name__}")
    if proxies.dim() != 2:
        raise ValueError(f"proxies must have shape (C * K, d), got {tuple(proxies.shape)}")
    if not proxies.is_floating_point():
        raise TypeError(f"proxies must be a floating-point tensor, got {proxies.dtype}")
    if proxies.shape[0] == 0 or proxies.shape[1] == 0:
        raise ValueError(f"proxies must not be empty, got shape {tuple(proxies.shape)}")
    if proxies.shape[0] % proxies_per_class:
        raise ValueError(
            f"proxies has {proxies.shape[0]} rows, not a multiple of proxies_per_class="
            f"{proxies_per_class}"
        )
    if validate:
        check_row_norms(proxies, "proxies")
    return proxies.shape[0] // proxies_per_class


def value_checks_on_host(t: torch.Tensor) -> bool:
    """Whether the value checks of a call on ``t`` run on the host (eager CPU) or as device-side
    assertions (CUDA and other devices, and under ``torch.compile``, which cannot trace a read of
    a tensor's value)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def assert_values_async(labels: torch.Tensor, num_classes: int, **rows: torch.Tensor) -> None:
    """Device-side assertions, without a host sync: ``labels`` lie in ``[0, num_classes)``, and
    every row of each tensor in ``rows`` (by name) has a finite norm above :data:`NORM_EPS` (what
    :func:`check_row_norms` checks on the host; one pass over the rows on the device)."""
    in_range = ((labels >= 0) & (labels < num_classes)).all()
    torch._assert_async(in_range, f"labels must lie in [0, {num_classes})")
    for name, t in rows.items():
        norms = torch.linalg.vector_norm(t.detach(), dim=1)
        torch._assert_async(
            (torch.isfinite(norms) & (norms > NORM_EPS)).all(),
            f"{name} have a row that is not finite, is zero, or whose norm overflows {t.dtype}",
        )
