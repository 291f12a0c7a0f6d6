"""Shared fixtures: one smoke run of the whole recipe (anchor, specialists, UniAlign, evaluation), made
once per test session and reused by every test that needs a finished run; and one uninterrupted
12-step UniAlign on its stages, the state every interrupted and resumed run must end in."""

import pytest

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
