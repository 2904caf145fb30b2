"""One torch thread for the diffusion tests (see `tests.conftest.one_torch_thread`), as in tests/cli."""

import pytest

from tests.conftest import one_torch_thread

one_thread = pytest.fixture(autouse=True, scope="package")(one_torch_thread)
