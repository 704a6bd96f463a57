"""Activation range observers and int8 quantization parameters.

Ranges come from a histogram of each tensor's values over the calibration data (2048 bins over
the observed range; over |x| for symmetric quantization). `minmax` takes the whole range,
`percentile` clips the tail, `entropy` picks the clipping threshold whose 128-level quantized
histogram is closest to the original in KL divergence (TensorRT's method), and `mse` the one that
minimises the expected squared error (rounding plus clipping).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 2048
OBSERVERS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class Histogram:
    """Counts of a tensor's values (or |values|, when symmetric) in BINS bins over [lo, hi]."""

    counts: np.ndarray
    lo: float
    hi: float
    symmetric: bool

    @classmethod
    def empty(cls, lo: float, hi: float, symmetric: bool) -> Histogram:
        if symmetric:
            lo, hi = 0.0, max(abs(lo), abs(hi))
        if hi - lo <= 4 * BINS * np.spacing(max(abs(lo), abs(hi))):  # (nearly) constant: too narrow for the bins
            hi = lo + max(abs(lo), 1e-8)
        return cls(np.zeros(BINS, np.int64), float(lo), float(hi), symmetric)

    def add(self, values: np.ndarray) -> None:
        v = np.abs(values) if self.symmetric else values
        self.counts += np.histogram(v, BINS, (self.lo, self.hi))[0]

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, BINS + 1)


def observe(observer: str, hist: Histogram, percentile: float = 99.99) -> tuple[float, float]:
    """The (lo, hi) range `observer` picks from `hist` (for a symmetric histogram lo = -hi)."""
    if observer == "minmax":
        lo, hi = hist.lo, hist.hi
    elif observer == "percentile":
        cdf = np.cumsum(hist.counts) / max(hist.counts.sum(), 1)
        edges = hist.edges
        hi = float(edges[min(np.searchsorted(cdf, percentile / 100) + 1, BINS)])
        lo = hist.lo if hist.symmetric else float(edges[np.searchsorted(cdf, 1 - percentile / 100)])
    elif observer == "entropy":
        lo, hi = hist.lo, _kl_threshold(hist)
    elif observer == "mse":
        lo, hi = _mse_range(hist)
    else:
        raise ValueError(observer)
    return (-hi, hi) if hist.symmetric else (lo, hi)


def _kl_threshold(hist: Histogram, levels: int = 128) -> float:
    """The |x| threshold whose clipped-and-quantized histogram diverges least from the original."""
    counts = hist.counts.astype(np.float64)
    best, best_kl = BINS, np.inf
    for stop in range(levels, BINS + 1, 16):
        p = counts[:stop].copy()
        p[-1] += counts[stop:].sum()  # clipped outliers land in the last bin
        if p.sum() == 0:
            continue
        # merge `stop` bins into `levels` groups, spread each group's mass over its non-empty bins
        groups = np.array_split(np.arange(stop), levels)
        q = np.zeros(stop)
        for g in groups:
            nonzero = counts[g] > 0
            if nonzero.any():
                q[g[nonzero]] = counts[g].sum() / nonzero.sum()
        q[-1] = max(q[-1], 0)
        mask = p > 0
        if (q[mask] == 0).any():
            continue
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-12)
        kl = float(np.sum(pn[mask] * np.log(pn[mask] / qn[mask])))
        if kl < best_kl:
            best, best_kl = stop, kl
    return float(hist.edges[best])


def _mse_range(hist: Histogram) -> tuple[float, float]:
    """Shrink the range by a common fraction while the expected squared int8 error falls."""
    centers = (hist.edges[:-1] + hist.edges[1:]) / 2
    counts = hist.counts.astype(np.float64)
    best, best_err = (hist.lo, hist.hi), np.inf
    for f in np.linspace(0.05, 1.0, 96):
        lo, hi = (-hist.hi * f, hist.hi * f) if hist.symmetric else (min(hist.lo * f, 0.0), max(hist.hi * f, 0.0))
        step = (hi - lo) / 255
        if step <= 0:
            continue
        clipped = np.clip(centers, 0.0 if hist.symmetric else lo, hi)  # |x| bins err like x
        err = float(np.sum(counts * ((centers - clipped) ** 2 + step * step / 12)))
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def activation_qparams(lo: float, hi: float, symmetric: bool) -> tuple[float, int]:
    """Scale and int8 zero point for the range [lo, hi]."""
    if symmetric:
        scale = max(abs(lo), abs(hi)) / 127
        return (scale if scale > 0 else 1.0), 0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255
    if scale <= 0:
        return 1.0, 0
    return scale, int(np.clip(np.round(-128 - lo / scale), -128, 127))


def weight_qparams(w: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric per-output-channel int8 scales of `w` along `axis` (all-zero channels get scale 1; scales never
    go subnormal, which would underflow to 0 for a channel of tiny weights)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    peak = np.abs(w).max(axis=reduce).astype(np.float32)
    return np.where(peak > 0, np.maximum(peak / 127, np.finfo(np.float32).tiny), 1.0).astype(np.float32)


def quantize(x: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    """Round-to-nearest-even int8 quantization (ONNX QuantizeLinear semantics)."""
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zero_point = np.reshape(scale, shape), np.reshape(zero_point, shape)
    return np.clip(np.rint(x / scale) + zero_point, -128, 127).astype(np.int8)


def dequantize(q: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    if axis is not None:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero_point = np.reshape(scale, shape), np.reshape(zero_point, shape)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)
