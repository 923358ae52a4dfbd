import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    """Tiny models run fastest on one thread; on a shared CPU more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
