"""What the audit compiles for: the feature widths, the cards and their limits, the open
findings (:data:`KNOWN_SPILLS`) and the plans that must fail (:data:`CALIBRATION`)."""

from __future__ import annotations

import dataclasses

#: The feature widths ``D`` audited (``--dims``' default).
DIMS = (64, 128, 256, 512, 768, 1024)
#: Pairs in the recorded calls: a power of two, as training batches are, so sizes and
#: strides get the divisibility hints they get on the card.
RECORD_ROWS = 4096


@dataclasses.dataclass(frozen=True)
class Target:
    """A card to compile for and the limits its launches must respect."""

    name: str
    cards: str
    capability: tuple[int, int]
    sm_count: int
    shared_per_block: int  # bytes one block may use (the opt-in maximum)
    shared_per_sm: int  # bytes of shared memory per multiprocessor
    #: Up to this D the plan promises kernels without register spills on this target
    #: (fused.py's docstring: sm_90 up to 1024); None: spills are reported, not failed.
    spill_free_up_to: int | None
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32

    @property
    def arch(self) -> int:
        return 10 * self.capability[0] + self.capability[1]


TARGETS = {
    "sm_90": Target("sm_90", "H100, H200", (9, 0), 132, 227 * 1024, 228 * 1024, 1024),
    "sm_80": Target("sm_80", "A100", (8, 0), 108, 163 * 1024, 164 * 1024, None),
}

#: Open findings: ``(launch, precision, D, target)`` of the current plan that spill where
#: the plan promises they do not. ``launch`` is the phase and the launch's place in it
#: (see :func:`record_launches`). Each is for the kernels' owner to fix in ``TilePlan``;
#: the audit fails once one no longer spills, until it is removed here. Open: the
#: same-item labels' variants, which hold a few more values per tile (the ids, the
#: targets' sums and weights) and spill 8 to 72 bytes at the plain passes' block sizes;
#: whether smaller blocks for them cost less than the spills is for a run on the card.
KNOWN_SPILLS: frozenset[tuple[str, str, int, str]] = frozenset(
    {
        ("backward atomic labels=positive #1", "bf16", 64, "sm_90"),
        ("backward atomic labels=positive #1", "ieee", 512, "sm_90"),
        ("backward atomic labels=positive #1", "tf32", 64, "sm_90"),
        ("backward atomic labels=positive #1", "tf32", 512, "sm_90"),
        ("backward two_kernels labels=ignore #2", "ieee", 128, "sm_90"),
        ("backward two_kernels labels=ignore #2", "tf32", 64, "sm_90"),
        *(("forward labels=positive #1", "ieee", d, "sm_90") for d in DIMS),
    }
)

#: Plans that must fail the audit, so that a broken measurement cannot pass it: a forward
#: tile far too large for one warp's registers, and one far too large for shared memory.
CALIBRATION = {
    "spill": ("ieee", 512, dict(block_m=128, block_n=64, num_warps=1, num_stages=1)),
    "shared": ("bf16", 512, dict(block_m=128, block_n=128, block_k=128, num_stages=8)),
}
