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


def _convolve_axis(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D convolution of [C, H, W] along `dim` (1 or 2) with an odd symmetric kernel, edges
    replicated, through the FFT: its cost does not grow with the kernel, which at sigma = 0.05 x
    the image side is a third of the image wide."""
    radius = kernel.numel() // 2
    pad = (0, 0, radius, radius) if dim == 1 else (radius, radius, 0, 0)
    padded = F.pad(x[:, None], pad, mode="replicate")[:, 0]  # [C, H + 2r, W] or [C, H, W + 2r]
    size = padded.shape[dim]  # circular: the wrap-around lands on the first 2r outputs, not kept
    spectrum = torch.fft.rfft(padded, n=size, dim=dim) * torch.fft.rfft(kernel, n=size).view(
        (1, -1, 1) if dim == 1 else (1, 1, -1))
    full = torch.fft.irfft(spectrum, n=size, dim=dim)
    return full.narrow(dim, 2 * radius, x.shape[dim])


def torch_gaussian_blur(channels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] with edge replication (scipy mode="nearest").

    Each channel's mean is taken out before the FFT and added back after (the kernel sums to
    1): the FFT's rounding error scales with the signal's level, and the min-max normalisation
    after the blur would magnify it on a nearly constant channel (a background channel, say).
    A constant channel comes back exactly."""
    kernel = gaussian_kernel1d(sigma, channels.device)
    x = channels.float()
    mean = x.mean(dim=(1, 2), keepdim=True)
    return _convolve_axis(_convolve_axis(x - mean, kernel, 1), kernel, 2) + mean


def _offsets(radius: int, dilation: int) -> list[tuple[int, int]]:
    """(dy, dx) of the (2r+1)^2 - 1 window neighbours, in pixels, centre left out."""
    steps = [i * dilation for i in range(-radius, radius + 1)]
    return [(dy, dx) for dy in steps for dx in steps if (dy, dx) != (0, 0)]


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """The view of an edge-replicated tensor [..., h + 2 pad, w + 2 pad] at offset (dy, dx)."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]


def _window_kernel(rgb, radius, dilation, scale, sxy, srgb=None) -> torch.Tensor:
    """Normalised Gaussian (or bilateral, with `srgb`) weights of the window. # [K*K-1, h, w]"""
    offsets = _offsets(radius, dilation)
    dist2 = torch.tensor([dy * dy + dx * dx for dy, dx in offsets], dtype=torch.float32, device=rgb.device)
    energy = (dist2 / scale**2 / (2 * sxy**2)).view(-1, 1, 1)  # distances in pixels of the original image
    height, width = rgb.shape[-2:]
    if srgb is not None:
        pad = radius * dilation
        padded = F.pad(rgb, (pad, pad, pad, pad), mode="replicate")[0]  # [3, h + 2 pad, w + 2 pad]
        colour2 = torch.stack([((_shifted(padded, pad, dy, dx, height, width) - rgb[0]) ** 2).sum(0)
                               for dy, dx in offsets])  # [K*K-1, h, w]
        energy = energy + colour2 / (2 * srgb**2)
    weights = torch.exp(-energy).expand(-1, height, width)
    return weights / weights.sum(0, keepdim=True).clamp_min(1e-12)  # normalised, as the lattice does


def _message(q: torch.Tensor, weights: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """sum over window neighbours j of weights_j * q(x + offset_j), for q [C, h, w]. # [C, h, w]

    One shifted view at a time, accumulated in place: no [C, K*K, h, w] tensor is built, which
    keeps the working set in cache on a CPU.
    """
    pad, (height, width) = radius * dilation, q.shape[-2:]
    padded = F.pad(q[None], (pad, pad, pad, pad), mode="replicate")[0]
    out = torch.zeros_like(q)
    for weight, (dy, dx) in zip(weights, _offsets(radius, dilation)):
        out.addcmul_(_shifted(padded, pad, dy, dx, height, width), weight)
    return out


def _spatial_message(q: torch.Tensor, weights: torch.Tensor, radius: int, dilation: int) -> torch.Tensor:
    """`_message` for weights that are the same at every pixel (the Gaussian kernel): one
    depthwise convolution."""
    size, pad = 2 * radius + 1, radius * dilation
    kernel = torch.cat([weights[:, 0, 0], weights.new_zeros(1)])  # the centre goes last ...
    order = list(range(size * size // 2)) + [size * size - 1] + list(range(size * size // 2, size * size - 1))
    kernel = kernel[order].view(1, 1, size, size).expand(q.shape[0], 1, size, size)  # ... into the middle
    padded = F.pad(q[None], (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, kernel, dilation=dilation, groups=q.shape[0])[0]


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
    q0 = F.interpolate(torch.from_numpy(probs).to(device).float()[None], size=size, mode="bilinear",
                       align_corners=False)
    unary = -torch.log(q0.clamp_min(1e-8))  # [1, C, h, w]
    r = CONV_WINDOW // 2
    wide = max(1, round(config.crf_bilateral_sxy * scale / r))
    near = max(1, round(config.crf_gaussian_sxy * scale / r))
    spatial = _window_kernel(rgb, r, near, scale, config.crf_gaussian_sxy)
    bilateral = _window_kernel(rgb, r, wide, scale, config.crf_bilateral_sxy, config.crf_bilateral_srgb)
    unary = unary[0]
    q = torch.softmax(-unary, dim=0)
    for _ in range(config.crf_iterations):
        message = (config.crf_gaussian_compat * _spatial_message(q, spatial, r, near)
                   + config.crf_bilateral_compat * _message(q, bilateral, r, wide))
        q = torch.softmax(-unary + message, dim=0)  # Potts: agreeing neighbours lower the energy
    q = F.interpolate(q[None], size=(height, width), mode="bilinear", align_corners=False)
    return q[0].cpu().numpy().astype(np.float32)
