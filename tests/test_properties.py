"""Property-based tests (hypothesis) of the int8 arithmetic and the observers, on generated data."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mixer_edge.quant.observers import (OBSERVERS, Histogram, activation_qparams, dequantize, observe, quantize,
                                        weight_qparams)

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
ranges = st.tuples(finite, finite).map(sorted).filter(lambda r: r[1] - r[0] > 1e-3)
tensors = arrays(np.float32, st.integers(1, 300), elements=finite)


@given(ranges, st.booleans(), tensors)
def test_round_trip_error_is_half_a_step_inside_the_range_and_values_saturate_outside(rng, symmetric, x):
    lo, hi = rng
    scale, zero = activation_qparams(lo, hi, symmetric)
    q = quantize(x, scale, zero)
    back = dequantize(q, scale, zero)
    representable = ((-128 - zero) * scale, (127 - zero) * scale)
    inside = (x >= representable[0]) & (x <= representable[1])
    assert np.all(np.abs(back[inside] - x[inside]) <= scale / 2 * (1 + 1e-5) + 1e-6 * np.abs(x[inside]))
    assert np.all(q[x > representable[1] + scale] == 127) and np.all(q[x < representable[0] - scale] == -128)


@given(ranges, st.booleans())
def test_the_range_is_covered_and_zero_is_exact(rng, symmetric):
    lo, hi = rng
    scale, zero = activation_qparams(lo, hi, symmetric)
    assert scale > 0 and -128 <= zero <= 127
    if symmetric:  # int8 symmetric: zero point 0, the larger magnitude maps to 127
        assert zero == 0 and np.isclose(scale * 127, max(abs(lo), abs(hi)), rtol=1e-6)
    else:  # affine: the range (widened to hold 0) fits the 256 levels to within one step
        assert (-128 - zero) * scale <= min(lo, 0) + scale and (127 - zero) * scale >= max(hi, 0) - scale
    assert dequantize(quantize(np.zeros(1, np.float32), scale, zero), scale, zero)[0] == 0.0


@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=finite), st.integers(0, 1))
def test_weight_scales_are_per_channel_symmetric_and_use_the_full_range(w, axis):
    scales = weight_qparams(w, axis)
    assert scales.shape == (w.shape[axis],) and np.all(scales > 0)
    q = quantize(w, scales, np.zeros_like(scales), axis)
    peak = np.abs(q.astype(np.int32)).max(axis=1 - axis)
    absmax = np.abs(w).max(axis=1 - axis)
    full = absmax >= 127 * np.finfo(np.float32).tiny  # below that the scale stops at the smallest normal float
    assert np.all(peak[full] == 127) and np.all(peak[absmax == 0] == 0)
    err = np.abs(dequantize(q, scales, np.zeros_like(scales), axis) - w)
    assert np.all(err <= np.expand_dims(scales, 1 - axis) / 2 * (1 + 1e-5) + 1e-6 * np.abs(w))


@settings(max_examples=100)
@given(arrays(np.float64, st.integers(2, 2000), elements=st.floats(-1e3, 1e3, allow_nan=False)),
       st.sampled_from(OBSERVERS), st.booleans(), st.floats(90, 100))
def test_observed_ranges_are_ordered_within_the_data_and_symmetric_when_asked(x, observer, symmetric, percentile):
    hist = Histogram.empty(float(x.min()), float(x.max()), symmetric)
    hist.add(x)
    assert hist.counts.sum() == len(x)  # nothing falls outside the histogram
    lo, hi = observe(observer, hist, percentile)
    assert lo <= hi
    if symmetric:
        assert lo == -hi and 0 < hi <= hist.hi * (1 + 1e-9)
    else:  # inside the observed range, which mse may stretch to hold 0
        assert min(hist.lo, 0) - 1e-9 <= lo and hi <= max(hist.hi, 0) + 1e-9
        if observer == "minmax":
            assert (lo, hi) == (hist.lo, hist.hi)
