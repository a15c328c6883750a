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
# Hunting for bugs: HYPOTHESIS_PROFILE=hunt draws new examples on every run (a failure prints
# the blob that reproduces it)
settings.register_profile("hunt", parent=settings.get_profile("dnls"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dnls"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.delenv("DNLS_BACKEND", raising=False)
