import math

import numpy as np
import pytest
import torch

from mixdq.metrics import images_to_tensor, psnr, sqnr, ssim


def _ssim_reference(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5, L=1.0) -> float:
    """Direct, loop-based SSIM (Wang et al. 2004): 2-D gaussian window, valid positions,
    mean over channels and positions.  Independent of the separable torch version."""
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-(ax ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for ch in range(x.shape[0]):
        for i in range(x.shape[1] - size + 1):
            for j in range(x.shape[2] - size + 1):
                a = x[ch, i:i + size, j:j + size]
                b = y[ch, i:i + size, j:j + size]
                ma, mb = (w * a).sum(), (w * b).sum()
                va = (w * (a - ma) ** 2).sum()
                vb = (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 20, 17, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(3, 20, 17, generator=g, dtype=torch.float64)).clamp(0, 1)
    want = _ssim_reference(x.numpy(), y.numpy())
    assert float(ssim(x, y)) == pytest.approx(want, abs=1e-10)
    assert 0.2 < want < 0.99  # a real, non-trivial value


def test_ssim_identity_symmetry_and_monotone_in_noise():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(x.shape, generator=g)
    y1, y2 = (x + 0.02 * noise).clamp(0, 1), (x + 0.2 * noise).clamp(0, 1)
    assert float(ssim(x, y1)) == pytest.approx(float(ssim(y1, x)), abs=1e-12)
    assert 1.0 > float(ssim(x, y1)) > float(ssim(x, y2))
    per = ssim(x, y2, reduction="none")
    assert per.shape == (2,) and float(per.mean()) == pytest.approx(float(ssim(x, y2)))


def test_ssim_small_images_use_smaller_window():
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64)
    y = x.flip(-1)
    v = float(ssim(x, y))
    assert -1.0 <= v < 1.0 and math.isfinite(v)


def test_psnr_known_value_and_identity():
    x = torch.zeros(1, 1, 4, 4)
    y = torch.full((1, 1, 4, 4), 0.1)  # mse = 0.01 -> 20 dB
    assert float(psnr(x, y)) == pytest.approx(20.0, abs=1e-6)
    assert math.isinf(float(psnr(x, x)))
    per = psnr(torch.zeros(2, 1, 2, 2), torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 0.01)]),
               reduction="none")
    assert per.tolist() == pytest.approx([20.0, 40.0])


def test_sqnr_known_value():
    ref = torch.ones(10, dtype=torch.float64)
    test = ref + 0.1  # signal 10, noise 0.1 -> 20 dB
    assert float(sqnr(ref, test)) == pytest.approx(20.0, abs=1e-9)
    assert math.isinf(float(sqnr(ref, ref)))
    per = sqnr(torch.ones(2, 5, dtype=torch.float64),
               torch.tensor([[1.1] * 5, [1.01] * 5], dtype=torch.float64), reduction="none")
    assert per.tolist() == pytest.approx([20.0, 40.0])


def test_integer_images_are_refused_with_a_hint():
    a = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(TypeError, match="images_to_tensor"):
        ssim(a, a)
    with pytest.raises(TypeError, match="float"):
        psnr(a, a)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_images_to_tensor_handles_uint8_without_wrapping():
    from PIL import Image

    a = np.zeros((8, 8, 3), dtype=np.uint8)
    b = np.full((8, 8, 3), 2, dtype=np.uint8)
    ta, tb = images_to_tensor([Image.fromarray(a)]), images_to_tensor([b])
    assert ta.shape == (1, 3, 8, 8) and ta.dtype == torch.float64
    # uint8 0 - 2 would wrap to 254; as floats the error is tiny, PSNR high
    assert float(psnr(ta, tb)) == pytest.approx(10 * math.log10(1 / (2 / 255) ** 2))
