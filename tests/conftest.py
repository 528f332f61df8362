"""Fixtures for the tests; the --device option and lanes are in the root conftest.py."""
import pytest


@pytest.fixture
def cuda_only(device):
    """Skip a test outside the GPU lane."""
    if device != "cuda":
        pytest.skip("GPU lane only (run with --device=cuda on a machine with a GPU)")
    return device
