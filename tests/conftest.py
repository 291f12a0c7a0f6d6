"""Shared fixtures: one cache folder for the whole test session (the world, its anchor and its prior
are built once, by the first run that needs them, and reused by every later one, in this process
and in the processes tests start); one smoke run of the whole recipe, made once per session and
reused by every test that needs a finished run; and one uninterrupted 12-step UniAlign on its
stages, the state every interrupted and resumed run must end in.

The session runs on one thread, and so do the processes it starts (OMP_NUM_THREADS is set before
torch is imported): the tests' models are tiny, so a second thread buys little; a process that
never started a thread pool can fork copies of itself safely (test_train.forked); and a run's
bits depend on its thread count, so every run of the suite compares like with like.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    previous, os.environ["UNIALIGN_CACHE"] = os.environ.get("UNIALIGN_CACHE"), str(folder)
    yield folder
    if previous is None:
        del os.environ["UNIALIGN_CACHE"]
    else:
        os.environ["UNIALIGN_CACHE"] = previous


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    import train  # here, not at the top: a broken module in a student copy fails only the tests that use it

    out = tmp_path_factory.mktemp("smoke")
    train.main(["--preset", "smoke", "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def uninterrupted(smoke, tmp_path_factory):
    """OUT of `train.py FLAGS` (test_train.py) run to the end on the smoke run's anchor and specialists."""
    import train
    from test_train import FLAGS, with_finished_stages

    out = with_finished_stages(smoke, tmp_path_factory.mktemp("uninterrupted") / "run")
    train.main([*FLAGS, "--out", str(out)])
    return out
