"""train.frozen: prefetched (order, errors and early stops of the background producer) and FrozenPrefix."""

import threading

import pytest

from train.frozen import mapped_in_order, prefetched


def test_yields_every_item_in_order_even_past_the_buffer_depth():
    assert list(prefetched(iter(range(1000)), depth=3)) == list(range(1000))


def test_a_producer_error_reaches_the_consumer_after_the_items_before_it():
    def items():
        yield from range(5)
        raise ValueError("scene 5 could not be rendered")

    seen = []
    with pytest.raises(ValueError, match="scene 5"):
        for item in prefetched(items(), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2, 3, 4]


def test_a_consumer_that_stops_early_stops_the_producer():
    produced = []

    def items():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetched(items(), depth=4)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) < 100


def test_frozen_prefix_runs_onnx_and_matches_eager(tmp_path, monkeypatch):
    """The cached maps come from ONNX Runtime (one output or two) and equal the eager module's to float16 rounding."""
    import torch
    from torch import nn

    from embed.runtime import onnxruntime_available
    from train.frozen import FrozenPrefix

    if not onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    monkeypatch.setenv("IMGSEARCH_ONNX_CACHE", str(tmp_path))
    torch.manual_seed(0)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
    top = nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.ReLU6())

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.top = stem, top

        def forward(self, x):
            s = self.stem(x)
            return s, self.top(s)

    x = torch.randn(5, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for module in (stem, Two()):
        prefix = FrozenPrefix(module, x[:2], kind=f"test-prefix-{type(module).__name__}")
        assert prefix.onnx is not None
        with torch.inference_mode():
            want = module.eval()(x)
        got = prefix(x)
        want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == torch.float16 and g.shape == w.shape
            torch.testing.assert_close(g.float(), w.float(), rtol=2e-3, atol=2e-3)
    assert len(list(tmp_path.glob("test-prefix-*.onnx"))) == 2  # exported once each, cached


def test_mapped_in_order_keeps_task_order_whatever_finishes_first():
    import time

    def slow_for_even(i: int) -> int:
        time.sleep(0.002 if i % 2 == 0 else 0.0)
        return i * i

    assert list(mapped_in_order(slow_for_even, range(50), workers=2, ahead=4)) == [i * i for i in range(50)]


def test_mapped_in_order_raises_the_task_error_and_stops_early():
    started = []

    def fn(i: int) -> int:
        started.append(i)
        if i == 3:
            raise ValueError("task 3 failed")
        return i

    stream = mapped_in_order(fn, range(1000), workers=2, ahead=4)
    with pytest.raises(ValueError, match="task 3 failed"):
        list(stream)
    assert len(started) < 20  # the tasks after the failure were never run
