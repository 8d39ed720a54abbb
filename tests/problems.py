"""Constructed calibration problems with known structure, shared by the algorithm tests."""

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
