"""Shared fixtures: one smoke run of the whole recipe (anchor, specialists, UniAlign, evaluation), made
once per test session and reused by every test that needs a finished run."""

import pytest

import train


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    train.main(["--preset", "smoke", "--out", str(out)])
    return out
