"""Input checks shared by every loss and backend.

The structural checks (types, ranks, shapes, devices) cost nothing and always run. The value checks
(labels in range, finite values) read the data. In eager mode on the CPU they run on the host
(reading a CPU tensor costs no synchronisation) and raise a ``ValueError``. Elsewhere (CUDA, and
any device while ``torch.compile`` traces) they are device-side assertions that never stall the
stream (:func:`assert_values_async`): the label range before the loss is computed, finiteness on
the loss itself, which is finite exactly when the embeddings and proxies are (normalised inputs,
log-sum-exps), so that no extra pass reads the C*K*d proxies. A failed device-side assertion
surfaces at the next synchronisation as a ``RuntimeError`` carrying the message. ``validate=False``
turns the value checks off. Without them a kernel would read out of bounds or return NaN, so they
are on by default.
"""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``, from two reductions (max and min propagate NaN and keep
    infinities) and one host sync, without ``isfinite``'s tensor-sized temporaries (the proxies
    can be gigabytes)."""
    return bool(torch.isfinite(torch.stack([t.amax(), t.amin()])).all())


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
    if validate and not all_finite(embeddings):
        raise ValueError(f"{name} contain NaN or infinite values")


def check_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    proxies: torch.Tensor,
    proxies_per_class: int,
    validate: bool = True,
) -> int:
    """Check the tensors of one loss call; return the number of classes ``C``."""
    check_embeddings_and_labels(embeddings, labels, validate)
    if not isinstance(proxies, torch.Tensor):
        raise TypeError(f"proxies must be a torch.Tensor, got {type(proxies).__name__}")
    if proxies.dim() != 2:
        raise ValueError(f"proxies must have shape (C * K, d), got {tuple(proxies.shape)}")
    if not proxies.is_floating_point():
        raise TypeError(f"proxies must be a floating-point tensor, got {proxies.dtype}")
    if embeddings.shape[1] != proxies.shape[1]:
        raise ValueError(
            f"embedding size {embeddings.shape[1]} differs from the proxies' {proxies.shape[1]}"
        )
    if embeddings.device != proxies.device or embeddings.device != labels.device:
        raise ValueError(
            "embeddings, labels and proxies must be on one device, got "
            f"{embeddings.device}, {labels.device} and {proxies.device}"
        )
    if proxies.shape[0] % proxies_per_class:
        raise ValueError(
            f"proxies has {proxies.shape[0]} rows, not a multiple of proxies_per_class="
            f"{proxies_per_class}"
        )
    num_classes = proxies.shape[0] // proxies_per_class
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    if validate:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]"
            )
        if not all_finite(proxies):
            raise ValueError("proxies contain NaN or infinite values")
    return num_classes


def value_checks_on_host(t: torch.Tensor) -> bool:
    """Whether the value checks of a call on ``t`` run on the host (eager CPU) or as device-side
    assertions (CUDA and other devices, and under ``torch.compile``, which cannot trace a read of
    a tensor's value)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def assert_values_async(labels: torch.Tensor, num_classes: int) -> None:
    """Device-side assertion that ``labels`` lie in ``[0, num_classes)``, without a host sync."""
    in_range = ((labels >= 0) & (labels < num_classes)).all()
    torch._assert_async(in_range, f"labels must lie in [0, {num_classes})")


def assert_finite_async(value: torch.Tensor) -> None:
    """Device-side assertion that the loss ``value`` is finite: with finite inputs it always is,
    so this checks the embeddings and proxies without reading them again."""
    torch._assert_async(
        torch.isfinite(value.detach()).all(),
        "the loss is not finite: the embeddings or the proxies contain NaN or infinite values",
    )
