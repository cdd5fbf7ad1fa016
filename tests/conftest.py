"""Test-wide settings. TRITON_INTERPRET must be set before any Triton kernel module is imported: CI has no GPU,
so the kernels run in Triton's interpreter on CPU tensors. Nothing may reach the network."""

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

if os.environ.get("QMLHFL_DATA"):  # absolute, for the subprocesses that run elsewhere (the README passes ../shared/data)
    os.environ["QMLHFL_DATA"] = str(Path(os.environ["QMLHFL_DATA"]).resolve())

warnings.filterwarnings("ignore", message=".*LeafSpec.*")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ (the benchmark tools, tested here) is imported from the checkout
    sys.path.insert(0, str(REPO))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multiprocess: starts several processes (torch.distributed over gloo on "
                            "127.0.0.1); deselect with -m 'not multiprocess'")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Read-only real datasets: $QMLHFL_DATA, else ../shared/data beside the checkout."""
    env = os.environ.get("QMLHFL_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    if not (root / "MNIST").exists():
        pytest.skip(f"real datasets not found under {root}; set QMLHFL_DATA")
    return root


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
