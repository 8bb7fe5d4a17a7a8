import os

import numpy as np
import pytest

from tests.backends import available_backends, get_backend

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(params=available_backends())
def backend(request):
    try:
        return get_backend(request.param)
    except ImportError as exc:  # the MLX adapter lands with the MLX backend
        pytest.skip(f"{request.param} backend adapter not available: {exc}")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
