"""Bit-for-bit reproducible CPU training: a fixed number of torch threads, and a record of it.

PyTorch's CPU kernels split reductions (matrix products, sums, their gradients) across its
intra-op threads, so the same seed trained with 1 and with 2 threads gives different weights
after the first step, and the difference grows with training. Torch's default thread count is
the machine's core count (or ``OMP_NUM_THREADS``, which Ray sets to a worker's CPUs), so
without a fixed count one seed gives one model per machine. Training code runs under
:func:`fixed_torch_threads`, and its report carries :func:`compute_fingerprint` so two runs that
still differ show why (another torch version or CPU instruction set can round differently).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fixed_torch_threads(num_threads: int) -> Iterator[None]:
    """Run the block with exactly ``num_threads`` torch intra-op threads, then restore.

    Args:
        num_threads: Threads; the result depends on this number, not on the machine's cores.

    Raises:
        ValueError: When ``num_threads`` < 1.
    """
    import torch

    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an integer >= 1, got {num_threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_fingerprint() -> dict[str, str | int]:
    """What a CPU training result depends on besides its seed and data.

    Returns:
        ``torch`` version, ``torch_threads`` in use and ``cpu_capability`` (the instruction
        set torch's kernels were dispatched for, e.g. ``AVX2``).
    """
    import torch

    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        capability = "unknown"
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": capability,
    }
