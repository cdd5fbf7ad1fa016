"""Fixtures that keep the recipe tests off the network: the download mirrors point at a closed local port, and the
real (read-only) datasets are named through $QMLHFL_DATA. Import them into a test module to use them."""

import pytest

DEAD_MIRROR = "http://127.0.0.1:9/"  # the discard port: nothing listens, every connection is refused


@pytest.fixture(autouse=True)
def offline_mirrors(monkeypatch):
    """A missing dataset file fails fast with the offline message instead of being fetched from the internet."""
    monkeypatch.setenv("QMLHFL_MNIST_MIRROR", DEAD_MIRROR)
    monkeypatch.setenv("QMLHFL_CIFAR10_MIRROR", DEAD_MIRROR)


@pytest.fixture
def data_env(data_root, monkeypatch):
    """$QMLHFL_DATA = the real datasets (skips when they are absent), for runs and their subprocesses."""
    monkeypatch.setenv("QMLHFL_DATA", str(data_root))
    return data_root
