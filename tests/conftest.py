"""Shared fixtures: one smoke run of the whole recipe (anchor, specialists, UniAlign, evaluation), made
once per test session and reused by every test that needs a finished run."""

import pytest


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    import train  # here, not at the top: a broken module in a student copy fails only the tests that use it

    out = tmp_path_factory.mktemp("smoke")
    train.main(["--preset", "smoke", "--out", str(out)])
    return out
