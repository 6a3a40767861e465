"""Data-parallel calibration: which rank this process is, and which prompts are its own.

Under `accelerate launch` (or `torchrun`), each process is a rank of a process group (NCCL on
GPUs, gloo on CPUs, set up by accelerate's `PartialState`). Ranks split the prompts into
contiguous blocks, so concatenating their shards in rank order gives exactly the prompt order of a
single-process run. A process started without a launcher is the only rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Ranks:
    """This process's place in a data-parallel run (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1
    local: int = 0
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank arrives here (no-op for a single process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def prompt_block(self, num_prompts: int) -> range:
        """The contiguous block of prompt indices this rank calibrates."""
        return range(self.rank * num_prompts // self.world, (self.rank + 1) * num_prompts // self.world)

    def device(self, device: str) -> str:
        """The device of this rank: `cuda` becomes this rank's local GPU."""
        return f"cuda:{self.local}" if device == "cuda" and self.world > 1 else device


def current_ranks(device: str) -> Ranks:
    """The ranks of the launcher that started this process, if any (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    from accelerate import PartialState

    state = PartialState(cpu=not device.startswith("cuda"))
    return Ranks(rank=state.process_index, world=state.num_processes, local=state.local_process_index, state=state)
