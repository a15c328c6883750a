"""Memory planning: plan_batches turns a byte budget into a batch size, and the batched
pipeline's peak memory follows the batch, not the image."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import dnls


def test_plan_grows_with_budget_and_shrinks_with_work():
    shape = (1, 2, 3, 64, 80)
    small = dnls.plan_batches(shape, 2**27, k=14, ps=5)
    large = dnls.plan_batches(shape, 2**28, k=14, ps=5)
    assert 1 <= small < large
    assert dnls.plan_batches(shape, 2**28, k=14, ps=5, steps=("search", "gather")) < large
    assert dnls.plan_batches(shape, 2**28, k=28, ps=5) < large
    cuda = dnls.plan_batches(shape, 2**28, k=14, ps=5, device="cuda")
    assert cuda > large  # no CPU workspace or padded frames


def test_plan_without_per_query_work_takes_the_whole_grid():
    """``ifold`` alone holds only what the whole call holds: one batch of every query."""
    assert dnls.plan_batches((1, 2, 3, 32, 40), 2**28, k=4, steps=("ifold",)) == 2 * 32 * 40


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(max_memory=1000), "max_memory"),
        (dict(max_memory=0), "max_memory"),
        (dict(max_memory=2**30, steps=("search", "blur")), "steps"),
        (dict(max_memory=2**30, steps="search"), "steps"),
        (dict(max_memory=2**30, k=0), "k"),
        (dict(max_memory=2**30, dtype=torch.int32), "dtype"),
        (dict(max_memory=2**30, steps=()), "steps"),
        (dict(max_memory=2**30, steps=None), "steps"),
        (dict(max_memory=2**30, steps=iter(["search"])), "steps"),
        (dict(max_memory=2**30, device="bogus"), "device"),
        (dict(max_memory=2**30, device=3), "device"),
    ],
)
def test_plan_errors(kwargs, name):
    args = dict(k=4, ps=3) | kwargs
    budget = args.pop("max_memory")
    with pytest.raises((ValueError, TypeError), match=f"^{name} must be"):
        dnls.plan_batches((1, 1, 3, 32, 32), budget, **args)


_PIPELINE = textwrap.dedent(
    """
    import resource, sys, torch, dnls
    from dnls.apps.nlm import nlm
    torch.manual_seed(0)
    nlm(torch.rand(1, 1, 3, 32, 32), 0.1, ps=5, ws=7, k=8)  # warm up: kernels, lazy init
    size, budget = int(sys.argv[1]), int(sys.argv[2])
    noisy = torch.rand(1, 1, 3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limit = dict(max_memory=budget) if budget > 0 else dict(batch=4096)
    nlm(noisy, 0.1, ps=5, ws=7, k=8, **limit)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """
)


def _peak_growth_kib(size: int, budget: int) -> int:
    # A fixed mmap threshold makes glibc return freed batch buffers to the system, so peak RSS
    # measures live memory rather than heap fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", _PIPELINE, str(size), str(budget)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_pipeline_memory_follows_the_batch_not_the_image():
    """NLM (search -> weights -> wpsum -> ifold) of a 128^2 and a 384^2 image in batches of
    4096 queries: peak RSS grows by about the image-sized tensors (input, output, counts,
    padded frames), not by the 9x larger number of queries; unbatched, the k-NN patches of the
    large image alone would add 384^2 * 8 * 75 * 4 B = 354 MB."""
    small, large = _peak_growth_kib(128, 0), _peak_growth_kib(384, 0)
    pixels = (384**2 - 128**2) * 3 * 4  # bytes of one more image-sized float32 tensor
    assert large - small < (8 * pixels + 16 * 2**20) / 1024, (small, large)


def test_pipeline_stays_within_the_planned_budget():
    """With ``max_memory``, the batch comes from :func:`dnls.plan_batches`; the whole call's
    peak RSS growth (its input was allocated before) stays under the budget."""
    budget = 48 * 2**20
    assert _peak_growth_kib(384, budget) * 1024 < budget
