"""Fit the normal CDF approximation that the Triton kernels' GELU uses (``kernels/_common.py``).

The lower tail is written Phi(-a) = exp(-a^2 / 2) * t * Q(t) with t = 1 / (1 + p a), a >= 0,
so that t * Q(t) -> the Mills-ratio term 1 / (a sqrt(2 pi)) as a grows and the Gaussian factor
carries the decay; Q is a polynomial in t in (0, 1]. The error weighed is that of Phi, relative
where Phi >= tau and absolute (scaled by 1 / tau) below, made minimax by Lawson's iteratively
reweighted least squares on a dense grid of t, for each p of a scan; the best p wins. The
reference, exp(a^2 / 2) Phi(-a) = erfcx(a / sqrt 2) / 2, is torch's float64 ``erfcx``.

    python tests/fit_normal_cdf.py            # prints P and Q0..Q6, and the fit's error

Developer tool: the package does not run it; ``tests/test_batch_norm_act.py`` bounds the error
of the constants the kernels ship, evaluated by the kernel in fp32.
"""
import argparse

import torch


def fit(p: float, degree: int, tau: float, iterations: int, points: int):
    """(coefficients Q0..Q_degree, weighted max error) for one p."""
    t = torch.linspace(1e-7, 1.0, points, dtype=torch.float64)
    a = (1.0 / t - 1.0) / p
    target = 0.5 * torch.special.erfcx(a / 2**0.5) / t  # what Q(t) should be
    gauss = torch.exp(-a * a / 2)
    cdf = torch.special.erfc(a / 2**0.5) / 2  # torch's ndtr is noise below 1e-16
    scale = gauss * t / torch.clamp(cdf, min=tau)  # d(weighted error) / d(Q error)
    basis = torch.vander(t, degree + 1, increasing=True)
    weights = torch.ones_like(t)
    for _ in range(iterations):
        w = weights.sqrt() * scale
        coef = torch.linalg.lstsq(basis * w[:, None], (target * w)[:, None]).solution[:, 0]
        err = ((basis @ coef - target) * scale).abs()
        weights = weights * err + 1e-300
        weights = weights / weights.sum()
    return coef, float(err.max())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degree", type=int, default=6)
    parser.add_argument("--tau", type=float, default=1e-4)
    args = parser.parse_args()
    scan = [0.28 + 0.002 * i for i in range(51)]
    p = min(scan, key=lambda p: fit(p, args.degree, args.tau, 30, 40000)[1])
    coef, err = fit(p, args.degree, args.tau, 200, 200000)
    print(f"P = {p!r}")
    for k, c in enumerate(coef.tolist()):
        print(f"Q{k} = {c!r}")
    print(f"weighted max error {err:.3g}")


if __name__ == "__main__":
    main()
