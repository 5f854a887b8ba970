"""GPU-friendly post-processing: a torch Gaussian blur equal to scipy's, and a convolutional CRF.

`blur_backend: torch` gives the same blur as scipy's `gaussian_filter(mode="nearest",
truncate=4)` on any torch device. `crf_backend: conv` is a mean-field CRF with the dense CRF's
Gaussian and bilateral kernels restricted to a local (for the bilateral kernel, dilated)
window (in the spirit of ConvCRF, Teichmann & Cipolla 2018), run on a copy of the image
downscaled to at most `CONV_MAX_SIDE` pixels; it approximates the faithful pydensecrf CRF and
runs on the GPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CONV_WINDOW = 11  # pixels of the downscaled image the messages reach, per side
CONV_MAX_SIDE = 160  # the CRF runs on an image this large at most, then upsamples


def gaussian_kernel1d(sigma: float, device=None) -> torch.Tensor:
    radius = int(4.0 * sigma + 0.5)  # scipy's truncate=4
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def torch_gaussian_blur(channels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] with edge replication (scipy mode="nearest")."""
    kernel = gaussian_kernel1d(sigma, channels.device)
    radius = kernel.numel() // 2
    x = channels[:, None]  # [C, 1, H, W]
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return x[:, 0]


def _neighbours(x: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """Values of the (2r+1)^2 - 1 window neighbours of every pixel. # [1, ch, K*K-1, h, w]"""
    size = 2 * radius + 1
    pad = radius * dilation
    cols = F.unfold(F.pad(x, (pad, pad, pad, pad), mode="replicate"), size, dilation=dilation)
    cols = cols.view(1, x.shape[1], size * size, *x.shape[2:])
    centre = size * size // 2
    return torch.cat([cols[:, :, :centre], cols[:, :, centre + 1 :]], dim=2)


def _window_kernel(rgb, radius, dilation, scale, sxy, srgb=None) -> torch.Tensor:
    """Normalised Gaussian (or bilateral, with `srgb`) weights of the window. # [1, K*K-1, h, w]"""
    steps = torch.arange(-radius, radius + 1, device=rgb.device, dtype=torch.float32) * dilation
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    dist2 = (dy**2 + dx**2).flatten() / scale**2  # in pixels of the original image
    centre = dist2.numel() // 2
    dist2 = torch.cat([dist2[:centre], dist2[centre + 1 :]]).view(1, -1, 1, 1)
    energy = dist2 / (2 * sxy**2)
    if srgb is not None:
        colour2 = ((_neighbours(rgb, radius, dilation) - rgb[:, :, None]) ** 2).sum(1)
        energy = energy + colour2 / (2 * srgb**2)
    weights = torch.exp(-energy).expand(1, -1, *rgb.shape[2:])
    return weights / weights.sum(1, keepdim=True).clamp_min(1e-12)  # normalised, as the lattice does


def conv_crf(image: np.ndarray, probs: np.ndarray, config, device=None) -> np.ndarray:
    """Mean-field refinement of probabilities [C, H, W] with windowed dense-CRF kernels.

    The Gaussian kernel uses a plain window; the bilateral kernel a dilated one that reaches
    about one bilateral sxy from each pixel, so colour edges can pull labels across regions.
    """
    device = torch.device(device or "cpu")
    n, height, width = probs.shape
    scale = min(1.0, CONV_MAX_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    rgb = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float()
    rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=True)
    q0 = F.interpolate(torch.from_numpy(probs).to(device)[None], size=size, mode="bilinear",
                       align_corners=False)
    unary = -torch.log(q0.clamp_min(1e-8))  # [1, C, h, w]
    r = CONV_WINDOW // 2
    wide = max(1, round(config.crf_bilateral_sxy * scale / r))
    near = max(1, round(config.crf_gaussian_sxy * scale / r))
    spatial = _window_kernel(rgb, r, near, scale, config.crf_gaussian_sxy)
    bilateral = _window_kernel(rgb, r, wide, scale, config.crf_bilateral_sxy, config.crf_bilateral_srgb)
    q = torch.softmax(-unary, dim=1)
    for _ in range(config.crf_iterations):
        message = (config.crf_gaussian_compat * (_neighbours(q, r, near) * spatial[:, None]).sum(2)
                   + config.crf_bilateral_compat * (_neighbours(q, r, wide) * bilateral[:, None]).sum(2))
        q = torch.softmax(-unary + message, dim=1)  # Potts: agreeing neighbours lower the energy
    q = F.interpolate(q, size=(height, width), mode="bilinear", align_corners=False)
    return q[0].cpu().numpy().astype(np.float32)
