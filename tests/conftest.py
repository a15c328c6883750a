import os

import pytest
import torch

# Without a GPU, the Triton kernels run under Triton's interpreter (read when a kernel module
# is imported, so it is set before any test runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

# Seeded, reproducible property tests: the same examples on every run and every machine.
settings.register_profile(
    "dnls",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("dnls")

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.delenv("DNLS_BACKEND", raising=False)
