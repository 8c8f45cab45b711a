"""A fixture that runs a test module's torch work on one thread.

``make test`` runs two pytest workers on two cores: a second intra-op thread per worker only
competes with the other worker (measured: a 230-step BatchNorm model took 12 s instead of
1.4 s on a loaded machine). Import the fixture and mark the module with
``pytest.mark.usefixtures("one_torch_thread")``.
"""

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
