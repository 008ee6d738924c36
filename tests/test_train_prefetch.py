"""train.frozen.prefetched: order, errors and early stops of the background producer."""

import threading

import pytest

from train.frozen import prefetched


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
