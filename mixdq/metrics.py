"""Image and tensor fidelity metrics: SSIM, PSNR, SQNR, as plain torch functions.

Everything works on *float* tensors.  Images are in [0, 1], shaped (N, C, H, W) or
(C, H, W).  uint8 input is refused on purpose: the reference implementation computed
its selection MSE on uint8 arrays, where differences wrap around (3 - 5 == 254); a float
cast is the caller's job and `images_to_tensor` does it for PIL / numpy images.

The app, the benchmarks and the sensitivity analysis all import these, so the numbers
they print agree with each other.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["ssim", "psnr", "sqnr", "images_to_tensor", "gaussian_window"]


def _check_float_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{what} expects torch tensors; convert images with mixdq.metrics.images_to_tensor")
    if not x.is_floating_point() or not y.is_floating_point():
        raise TypeError(
            f"{what} expects float tensors, got {x.dtype} and {y.dtype}: integer images wrap around "
            "when subtracted; convert with images_to_tensor (uint8 -> float in [0, 1])")
    if x.shape != y.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    # float64 accumulation: SSIM on near-identical images is a difference of nearly equal
    # numbers, and SQNR of a good 8-bit layer needs ~1e-8 relative noise resolved.
    return x.double(), y.double()


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    """1-D normalised gaussian used (separably) by SSIM."""
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n, n - len(g) + 1) matrix M with M[j + i, j] = g[i]: t @ M is the valid 1-D filtering."""
    k = len(g)
    m = torch.zeros(n, n - k + 1, dtype=g.dtype)
    for i in range(k):
        m[torch.arange(n - k + 1) + i, torch.arange(n - k + 1)] = g[i]
    return m


def _as_batch(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() == 3:
        return x.unsqueeze(0)
    if x.dim() == 4:
        return x
    raise ValueError(f"{what} expects images shaped (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), the standard formulation.

    Gaussian window (11 taps, sigma 1.5) applied separably, *valid* convolution (no padding,
    so borders do not invent structure), C1 = (k1 L)^2, C2 = (k2 L)^2, SSIM averaged over
    pixels and channels.  Images smaller than the window use a window as large as the
    image (odd), so tiny test images still give a meaningful number.

    reduction: "mean" -> scalar over the batch, "none" -> one value per image.
    """
    x, y = _check_float_pair(x, y, "ssim")
    x, y = _as_batch(x, "ssim"), _as_batch(y, "ssim")
    n, c, h, w = x.shape
    size = min(window_size, h, w)
    if size % 2 == 0:
        size -= 1
    g = gaussian_window(size, sigma)
    # Separable "valid" gaussian filtering as two matmuls with banded matrices: the same sums
    # as a grouped conv2d, but float64 matmul goes through BLAS (conv2d in float64 does not),
    # ~10x faster on CPU; sensitivity computes one SSIM per layer and bit-width.
    gh, gw = _band(h, g).to(x.device), _band(w, g).to(x.device)

    def blur(t):
        return gh.T @ t @ gw

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x ** 2
    syy = blur(y * y) - mu_y ** 2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    per_image = smap.flatten(1).mean(1)
    return _reduce(per_image, reduction, "ssim")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image then reduced.  Identical images -> +inf.

    "mean" averages the per-image dB values (what image papers report)."""
    x, y = _check_float_pair(x, y, "psnr")
    x, y = _as_batch(x, "psnr"), _as_batch(y, "psnr")
    mse = ((x - y) ** 2).flatten(1).mean(1)
    per_image = 10 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> inf, on purpose
    return _reduce(per_image, reduction, "psnr")


def sqnr(reference: torch.Tensor, test: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (test - ref)^2).

    reduction: "sum" pools signal and noise over the whole tensor (the paper's definition, and
    stable when a single sample has tiny energy); "none" gives one value per leading index.
    Identical tensors -> +inf.
    """
    ref, tst = _check_float_pair(reference, test, "sqnr")
    if reduction == "sum":
        signal, noise = (ref ** 2).sum(), ((tst - ref) ** 2).sum()
    elif reduction == "none":
        if ref.dim() == 0:
            raise ValueError("sqnr(reduction='none') needs a leading batch dimension")
        signal, noise = (ref ** 2).flatten(1).sum(1), ((tst - ref) ** 2).flatten(1).sum(1)
    else:
        raise ValueError(f"sqnr reduction must be 'sum' or 'none', got {reduction!r}")
    return 10 * torch.log10(signal / noise)


def _reduce(values: torch.Tensor, reduction: str, what: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"{what} reduction must be 'mean' or 'none', got {reduction!r}")


def images_to_tensor(images: Sequence | torch.Tensor) -> torch.Tensor:
    """PIL images / HWC uint8 or float numpy arrays / a tensor -> float64 (N, C, H, W) in [0, 1]."""
    import numpy as np

    if isinstance(images, torch.Tensor):
        t = images
        if not t.is_floating_point():
            t = t.double() / 255.0
        return _as_batch(t.double(), "images_to_tensor")
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    out = []
    for im in images:
        a = np.asarray(im)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.dtype == np.uint8:
            a = a.astype(np.float64) / 255.0
        elif np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float64)
        else:
            raise TypeError(f"images_to_tensor: unsupported image dtype {a.dtype}")
        out.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1))
    if not out:
        raise ValueError("images_to_tensor: no images given")
    return torch.stack(out)
