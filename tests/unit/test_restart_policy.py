import random

from keepgpu.supervisor.policy import RestartPolicy


def make(**kw):
    return RestartPolicy(rng=random.Random(1), **kw)


def test_delay_doubles_with_jitter_and_caps():
    p = make(initial_s=1, max_s=8, jitter=0.1, max_restarts=100, window_s=1e9)
    delays = [p.on_crash(float(i), up_for_s=0) for i in range(6)]
    for got, base in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert base * 0.9 <= got <= base * 1.1


def test_delay_resets_after_a_healthy_run():
    p = make(initial_s=1, jitter=0, max_restarts=100, window_s=1e9, healthy_reset_s=60)
    assert [p.on_crash(t, 0) for t in (0, 1, 2)] == [1, 2, 4]
    assert p.on_crash(100, up_for_s=61) == 1


def test_more_than_max_restarts_in_window_gives_up():
    p = make(max_restarts=3, window_s=300, jitter=0)
    assert all(p.on_crash(t, 0) is not None for t in (0, 10, 20))
    assert p.on_crash(30, 0) is None


def test_old_restarts_leave_the_window():
    p = make(max_restarts=2, window_s=100, jitter=0)
    assert p.on_crash(0, 0) is not None
    assert p.on_crash(10, 0) is not None
    assert p.on_crash(120, 0) is not None  # both earlier ones are older than 100 s


def test_reset_clears_history():
    p = make(max_restarts=1, jitter=0)
    p.on_crash(0, 0)
    assert p.on_crash(1, 0) is None
    p.reset()
    assert p.on_crash(2, 0) == 1
