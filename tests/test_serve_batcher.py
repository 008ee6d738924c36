"""serve.batcher.MicroBatcher on its own: every job gets its own answer, failures stay with
their job, and several batcher threads never strand a waiting request."""

import threading
import time

import pytest

from serve.batcher import Arrivals, MicroBatcher


def _burst(batcher: MicroBatcher, arrivals: Arrivals, jobs: list, join_s: float = 10.0) -> dict:
    answers: dict = {}

    def one(job):
        arrivals.enter()
        time.sleep(0.0001 * (job % 3))  # staggered arrivals: batcher threads race for the jobs
        try:
            answers[job] = batcher.submit(job)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            answers[job] = exc

    threads = [threading.Thread(target=one, args=(job,), daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(join_s)
    stranded = [job for job in jobs if job not in answers]
    assert not stranded, f"requests {stranded} never got an answer"
    return answers


def test_two_batcher_threads_answer_every_request_of_many_bursts():
    # Regression: with a SimpleQueue shared by two batcher threads, a get(timeout) could
    # block forever and strand the jobs it had already collected (a hung CI run).
    arrivals = Arrivals()
    sizes: list[int] = []
    batcher = MicroBatcher(lambda jobs: [job * 2 for job in jobs], window_ms=20, arrivals=arrivals,
                           threads=2, on_batch=sizes.append)
    for round_ in range(200):
        jobs = list(range(round_ * 10, round_ * 10 + 6))
        assert _burst(batcher, arrivals, jobs) == {job: job * 2 for job in jobs}
    assert sum(sizes) == 1200 and max(sizes) > 1, "concurrent submits should share batches"


def test_a_failing_job_fails_only_its_own_request():
    arrivals = Arrivals()

    def run(jobs):
        return [ValueError(f"bad job {job}") if job == 3 else job for job in jobs]

    answers = _burst(MicroBatcher(run, window_ms=5, arrivals=arrivals), arrivals, list(range(6)))
    assert isinstance(answers[3], ValueError) and "bad job 3" in str(answers[3])
    assert {job: answers[job] for job in (0, 1, 2, 4, 5)} == {0: 0, 1: 1, 2: 2, 4: 4, 5: 5}


@pytest.mark.parametrize("broken", ["raises", "wrong_count", "on_batch_raises"])
def test_a_broken_batch_wakes_every_waiter_with_an_error(broken):
    arrivals = Arrivals()

    def run(jobs):  # broken for the first burst only
        if 7 in jobs or broken == "on_batch_raises":
            return jobs
        if broken == "raises":
            raise RuntimeError("model crashed")
        return jobs[:-1]

    def on_batch(size):
        if broken == "on_batch_raises" and size and not sizes_seen.append(size):
            raise RuntimeError("metrics broke")

    sizes_seen: list[int] = []
    batcher = MicroBatcher(run, window_ms=5, arrivals=arrivals, on_batch=on_batch)
    answers = _burst(batcher, arrivals, list(range(4)))
    if broken == "on_batch_raises":  # a metrics failure must not lose the answers
        assert answers == {0: 0, 1: 1, 2: 2, 3: 3}
    else:
        assert all(isinstance(a, RuntimeError) for a in answers.values()), answers
    assert _burst(batcher, arrivals, [7]) == {7: 7}, "the batcher thread survives a broken batch"


def test_a_lone_request_does_not_wait_for_the_window():
    arrivals = Arrivals()
    batcher = MicroBatcher(lambda jobs: jobs, window_ms=2000, arrivals=arrivals)
    start = time.perf_counter()
    assert _burst(batcher, arrivals, [1]) == {1: 1}
    assert time.perf_counter() - start < 1.0


def test_bad_settings_are_refused_with_their_values():
    with pytest.raises(ValueError, match="-1"):
        MicroBatcher(lambda jobs: jobs, window_ms=-1)
    with pytest.raises(ValueError, match="0"):
        MicroBatcher(lambda jobs: jobs, threads=0)
