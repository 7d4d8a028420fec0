"""Chunked delta norms against a float64 reference."""

import math

import pytest
import torch

from mergekit_nan.core import norms
from mergekit_nan.core.norms import delta_norms, weight_norms


def reference(base, tuned):
    b = base.double()
    return b.norm().item(), [(t.double() - b).norm().item() for t in tuned]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (4, 1000), (3, 5, 7)])
@pytest.mark.parametrize("chunk", [0, 1, 64, 1000])  # 0: the default slice size
def test_matches_float64_reference(dtype, shape, chunk):
    gen = torch.Generator().manual_seed(hash((str(dtype), shape, chunk)) % 2**31)
    base = torch.randn(shape, generator=gen).to(dtype)
    tuned = [(base.float() + s * torch.randn(shape, generator=gen)).to(dtype) for s in (1e-3, 1e-1, 3.0)]
    got = delta_norms(base, tuned, chunk=chunk)
    want_base, want = reference(base, tuned)
    assert got.base_norm == pytest.approx(want_base, rel=1e-6)
    assert list(got.delta_norms) == pytest.approx(want, rel=1e-6)


def test_many_slices_accumulate_exactly_enough():
    # 3M elements over 6 default slices and a ragged tail.
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3_000_001, generator=gen).to(torch.bfloat16)
    tuned = [(base.float() + 1e-2 * torch.randn(base.shape, generator=gen)).to(torch.bfloat16)]
    got = delta_norms(base, tuned)
    assert got.delta_norms[0] == pytest.approx(reference(base, tuned)[1][0], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_squares_that_overflow_float32_stay_finite(dtype):
    base = torch.zeros(1000, dtype=dtype)
    tuned = [torch.full((1000,), 1e30, dtype=dtype), torch.full((1000,), -3e37, dtype=dtype)]
    got = delta_norms(base, tuned)
    want = reference(base, tuned)[1]
    assert all(math.isfinite(n) for n in got.delta_norms)
    assert list(got.delta_norms) == pytest.approx(want, rel=1e-6)


def test_fp16_squares_that_overflow_fp16_are_exact():
    base = torch.zeros(4096, dtype=torch.float16)
    tuned = [torch.full((4096,), 60000.0, dtype=torch.float16)]  # 60000^2 >> fp16 max
    assert delta_norms(base, tuned).delta_norms[0] == pytest.approx(60000.0 * 64, rel=1e-6)


def test_tiny_deltas_are_not_lost_to_underflow():
    # float32 squares of 1e-30 underflow to 0; the float64 rescue keeps the norm.
    tiny = delta_norms(torch.zeros(100), [torch.full((100,), 1e-30)])
    assert tiny.delta_norms[0] == pytest.approx(1e-29, rel=1e-6, abs=0)
    unchanged = delta_norms(torch.ones(100), [torch.ones(100)])
    assert unchanged.delta_norms[0] == 0.0


def test_tiny_base_and_weights_are_not_lost_to_underflow():
    # a base whose float32 squares all underflow is not an all-zero base (abs=0: approx
    # would otherwise accept 0.0 for any value below 1e-12)
    tiny = torch.full((100,), 1e-24)
    assert delta_norms(tiny, [tiny * 2]).base_norm == pytest.approx(1e-23, rel=1e-6, abs=0)
    assert weight_norms([tiny])[0] == pytest.approx(1e-23, rel=1e-6, abs=0)
    assert delta_norms(torch.zeros(100), [torch.zeros(100)]).base_norm == 0.0


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_inputs_give_non_finite_norms(poison):
    base = torch.zeros(10)
    bad = torch.zeros(10)
    bad[3] = poison
    got = delta_norms(base, [torch.ones(10), bad])
    assert math.isfinite(got.delta_norms[0]) and not math.isfinite(got.delta_norms[1])
    got = delta_norms(bad, [torch.ones(10)])
    assert not math.isfinite(got.base_norm)


def test_non_contiguous_inputs():
    base = torch.randn(64, 48)
    tuned = [base + 0.5 * torch.randn(48, 64).t()]
    assert delta_norms(base.t().contiguous().t(), tuned).delta_norms[0] == pytest.approx(
        reference(base, tuned)[1][0], rel=1e-6
    )


@pytest.mark.parametrize("chunk", [7, 1 << 10])
def test_device_side_accumulation_matches_host_side(chunk):
    # The accelerator path (sums kept on the device, one sync at the end) runs here
    # on CPU tensors: no GPU is needed to check its arithmetic.
    base = torch.randn(5000, dtype=torch.float64).to(torch.bfloat16)
    tuned = [
        (base.double() + 0.01 * (i + 1) * torch.randn(5000, dtype=torch.float64)).to(torch.bfloat16) for i in range(3)
    ]
    host = norms._sums_of_squares(base, tuned, chunk, torch.float32, on_cpu=True)
    device = norms._sums_of_squares(base, tuned, chunk, torch.float32, on_cpu=False)
    want = [(base.double() ** 2).sum().item()] + [((t.double() - base.double()) ** 2).sum().item() for t in tuned]
    assert device == pytest.approx(want, rel=1e-6, abs=0)
    assert device == pytest.approx(host, rel=1e-6, abs=0)


def test_threads_get_their_own_kept_scratch():
    # A merge keeps one Scratch between calls (no page faults per tensor); two threads
    # norming at once with it must not write into each other's slices.
    import threading

    gen = torch.Generator().manual_seed(7)
    jobs = []
    for scale in (1e-3, 1.0):
        base = torch.randn(1 << 20, generator=gen).to(torch.bfloat16)
        tuned = [(base.float() + scale * torch.randn(base.shape, generator=gen)).to(torch.bfloat16)]
        jobs.append((base, tuned, reference(base, tuned)[1][0]))
    errors = []
    scratch = norms.Scratch()

    def run(base, tuned, want):
        for _ in range(20):
            got = delta_norms(base, tuned, scratch=scratch).delta_norms[0]
            if got != pytest.approx(want, rel=1e-6, abs=0):
                errors.append((want, got))

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    same = scratch.slices(10, torch.float32, torch.device("cpu"))
    again = scratch.slices(1000, torch.float32, torch.device("cpu"))
    assert same.data_ptr() == again.data_ptr()  # kept, not reallocated
