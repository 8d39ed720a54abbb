"""Constructed problems with known structure: calibration data shared by the algorithm tests, and the awkward
packed weight shared by the kernel tests."""

import torch

from gqsa.algorithms.hessian import HessianAccumulator


def correlated_inputs(tokens=512, k=64, seed=0, outlier_columns=False):
    """(tokens, k) inputs with strongly correlated columns (as real activations are), so compensation has work
    to do; with ``outlier_columns`` every 8th column is 20x larger (activation outliers)."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(k // 4, k, generator=gen)
    x = torch.randn(tokens, k // 4, generator=gen) @ basis + 0.1 * torch.randn(tokens, k, generator=gen)
    if outlier_columns:
        x[:, ::8] *= 20.0
    return x


def hessian(x):
    """H = 2/n X^T X of (n, k) inputs."""
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.hessian


def output_error(w, wq, h):
    """tr((Wq - W) H (Wq - W)^T): the layer's output squared error on the calibration inputs (times 2/n)."""
    d = wq - w
    return float(((d @ h) * d).sum())


def awkward_packed(bits, group_size, symmetric, kept="mixed", n=37, groups=7, seed=0):
    """A packed (n, group_size * groups) weight for kernel tests: n = 37 rows (no tile divides it); ``kept``
    "all", "none", or "mixed": about half the groups at random, row 0 full, row 5 and the last row empty."""
    from gqsa.format import quantize_to_packed

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, group_size * groups, generator=gen) * 0.1  # (N, K)
    if kept == "all":
        mask = torch.ones(n, groups, dtype=torch.bool)
    elif kept == "none":
        mask = torch.zeros(n, groups, dtype=torch.bool)
    else:
        mask = torch.rand(n, groups, generator=gen) < 0.5  # (N, G)
        mask[0] = True  # a full row
        mask[5] = False  # rows with no kept group, one of them the last
        mask[-1] = False
    return quantize_to_packed(w, mask, bits, group_size, symmetric=symmetric)
