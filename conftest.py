"""
pytest configuration: each test runs in its own temporary directory, as
trial runs tests in C{_trial_temp}, so files made with C{self.mktemp()}
never land in the source tree.
"""

import pytest


@pytest.fixture(autouse=True)
def _inTemporaryDirectory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
