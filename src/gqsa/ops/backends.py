"""Kernel registry behind the ``gqsa::linear`` op: an explicit backend choice per call.

``reference`` (unpack, dequantize, dense matmul) runs everywhere and is the oracle. Native and Triton kernels
register themselves here with the device types they serve and an availability check; ``auto`` takes the
first available kernel for the input's device in priority order and falls back to the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

logger = logging.getLogger(__name__)


class Backend(str, Enum):
    """Which implementation computes ``gqsa::linear``."""

    AUTO = "auto"
    REFERENCE = "reference"


@dataclass(frozen=True)
class Kernel:
    """One implementation of ``gqsa::linear``.

    fn has the op's signature minus ``backend``; ``available()`` says whether it can run in this process
    (e.g. its extension compiled); ``priority``: higher is preferred by ``auto``. ``exact``: computes the op on
    the given x (False: an approximation such as int8 activations, which ``auto`` never picks and
    ``available_backends`` lists only when asked). ``named_only``: device types (a subset of ``device_types``)
    where the kernel runs only when asked for by name, never by ``auto`` (Triton's interpreter on CPU).

    The kernel contract: ``prepare(crow_indices, col_indices, values, scale, zero_point, bias, out_features,
    in_features, group_size, bits)`` (the op's arguments after x, already checked) builds the backend's layout
    from the packed weight once and returns the function ``x -> y`` that runs on it; ``bind_linear`` and the
    layers call it once per weight. Kernels that run on the packed tensors as they are leave it None (the bound
    function then calls ``fn``); ``fn`` is the op's per-call entry (a kernel with a layout keeps it cached).
    """

    name: str
    device_types: frozenset[str]
    fn: Callable[..., torch.Tensor]
    available: Callable[[], bool]
    priority: int = 0
    exact: bool = True
    named_only: frozenset[str] = frozenset()
    prepare: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None


_KERNELS: dict[str, Kernel] = {}
_warned: set[tuple[str, str]] = set()


def register_kernel(kernel: Kernel) -> None:
    """Add (or replace) a kernel by name."""
    if kernel.name in (Backend.AUTO.value, Backend.REFERENCE.value):
        raise ValueError(f"kernel name {kernel.name!r} is reserved")
    _KERNELS[kernel.name] = kernel


def available_backends(device_type: str = "cpu", approximate: bool = False, named_only: bool = False) -> list[str]:
    """Names accepted as ``backend`` for tensors on ``device_type`` (always includes auto and reference); the
    approximate kernels (``Kernel.exact`` False) only with ``approximate=True``, and the kernels that serve this
    device type only by name (``Kernel.named_only``) only with ``named_only=True``."""
    names = [k.name for k in sorted(_KERNELS.values(), key=lambda k: -k.priority)
             if _usable(k, device_type) and (k.exact or approximate)
             and (named_only or device_type not in k.named_only)]
    return [Backend.AUTO.value, Backend.REFERENCE.value, *names]


def _usable(kernel: Kernel, device_type: str) -> bool:
    return device_type in kernel.device_types and kernel.available()


def select_kernel(backend: str, device_type: str, reference: Callable[..., torch.Tensor]) -> Callable:
    """The function that serves ``backend`` on ``device_type`` (``reference`` for the reference).

    Raises:
        ValueError: an unknown backend name, or a known one that cannot run on this device/process.
    """
    kernel = resolve_kernel(backend, device_type)
    return reference if kernel is None else kernel.fn


def resolve_kernel(backend: str, device_type: str) -> Kernel | None:
    """The kernel that serves ``backend`` on ``device_type``; None for the reference implementation.

    Raises:
        ValueError: an unknown backend name, or a known one that cannot run on this device/process.
    """
    if backend == Backend.REFERENCE.value:
        return None
    if backend == Backend.AUTO.value:
        for kernel in sorted(_KERNELS.values(), key=lambda k: -k.priority):
            if kernel.exact and device_type not in kernel.named_only and _usable(kernel, device_type):
                return kernel
        key = ("auto", device_type)
        if key not in _warned:
            _warned.add(key)
            logger.info("gqsa::linear: no fast kernel for device %r; using the reference implementation", device_type)
        return None
    kernel = _KERNELS.get(backend)
    if kernel is None:
        known = [Backend.AUTO.value, Backend.REFERENCE.value, *_KERNELS]
        raise ValueError(f"unknown gqsa backend {backend!r}; known backends: {known}")
    if not _usable(kernel, device_type):
        raise ValueError(
            f"gqsa backend {backend!r} cannot run on device type {device_type!r} here; "
            f"available: {available_backends(device_type, approximate=True, named_only=True)}"
        )
    return kernel
