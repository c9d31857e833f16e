"""Helpers shared by the float64 NumPy references of test_parametric / test_ranking_losses."""
import math

import numpy as np


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_cos(u, v):
    nu, nv = max(np.linalg.norm(u), 1e-12), max(np.linalg.norm(v), 1e-12)
    return float(np.dot(u, v) / (nu * nv))


def np_logsumexp(values):
    values = list(values)
    if not values:
        return 0.0
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def fd_grad(f, x, h=1e-6):
    """Central finite differences of a float64 NumPy function of one array."""
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        g[idx] = (f(up) - f(down)) / (2 * h)
    return g


def random_emb(rng, n, d):
    return rng.normal(size=(n, d))
