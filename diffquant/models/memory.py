"""Give a released float weight's memory back to the system when it is a view of a mapped file.

`from_pretrained` maps a safetensors file privately (`mmap`, copy-on-write) and every parameter is
a view into that one mapping. Dropping a parameter therefore frees nothing: the mapping lives as
long as any tensor from the file does, and the pages a forward pass touched stay resident. Stage
two replaces the float layers one by one, so without this the unquantized model stays resident to
the end and peak memory is the float model plus the quantized one.

`release_file_pages(tensor)` tells the kernel that the whole pages inside `tensor`'s bytes are no
longer needed (`madvise(MADV_DONTNEED)`, Linux): for a private file mapping, the resident copies
are dropped and a later read would fetch the file's bytes again. It only acts on a CPU tensor
that (1) lies inside a private mapping of a regular file (read from `/proc/self/maps`) and (2) is
the only tensor using its storage, so no live tensor elsewhere sees its bytes change. Pages that
the tensor shares with a neighbour (its first and last partial pages) are kept. On any other
system, tensor or mapping it does nothing and returns 0.

`FilePageReleaser` waits for a weight that is still shared (a block's home tensor, block by
block) and releases it once it is not.

Example:
    >>> import torch
    >>> release_file_pages(torch.ones(1024))  # anonymous memory: not a file view, left alone
    0
    >>> releaser = FilePageReleaser()
    >>> releaser.add(torch.ones(1024)); releaser.released_bytes
    0
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch

_PAGE = mmap.PAGESIZE


def release_file_pages(tensor: torch.Tensor) -> int:
    """Drop the resident pages of a file-mapped tensor about to be released; the bytes dropped."""
    if not _is_file_view(tensor) or _storage_users(tensor.untyped_storage()) != 1:
        return 0
    return _drop_pages(tensor.untyped_storage())


def _is_file_view(tensor: torch.Tensor) -> bool:
    """A CPU tensor of at least a page inside a private mapping of a regular file (Linux only)."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.is_meta:
        return False
    storage = tensor.untyped_storage()
    start, nbytes = storage.data_ptr(), storage.nbytes()
    return nbytes >= _PAGE and _in_private_file_mapping(start, start + nbytes)


def _drop_pages(storage: torch.UntypedStorage) -> int:
    """`madvise(MADV_DONTNEED)` on the whole pages inside `storage`'s bytes; the bytes dropped."""
    start, nbytes = storage.data_ptr(), storage.nbytes()
    first = -(-start // _PAGE) * _PAGE
    last = (start + nbytes) // _PAGE * _PAGE
    if last <= first:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED) != 0:
        return 0  # advice only: a refusal (EINVAL on an odd mapping) leaves the pages as they were
    return last - first


class FilePageReleaser:
    """Released weights whose file pages go back as soon as nothing else uses their storage.

    Block by block, the placement keeps each held block's home tensors until the block is let go,
    so a weight swapped out mid-block is still shared then.
    `add` keeps file-mapped ones (anonymous memory is freed by dropping the tensor; the process's
    mappings are read once per weight, there), and `flush`, called after each layer and at the
    end, releases those no other tensor uses any more.
    """

    def __init__(self) -> None:
        self._waiting: list[torch.Tensor] = []
        self.released_bytes = 0

    def add(self, tensor: torch.Tensor) -> None:
        """Keep `tensor` for the next `flush` when it is a file view (read once, here)."""
        if _is_file_view(tensor):
            self._waiting.append(tensor)

    def flush(self) -> None:
        """Release every kept tensor no other tensor uses now; keep the rest."""
        still_shared = []
        for tensor in self._waiting:
            storage = tensor.untyped_storage()
            if _storage_users(storage) == 1:
                self.released_bytes += _drop_pages(storage)
            else:
                still_shared.append(tensor)
        self._waiting = still_shared


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim(0)`; elsewhere nothing).

    Temporaries below glibc's mmap threshold (which rises to 32 MiB after the first large free)
    come from the heap, and their pages stay in the process after `free` until trimmed: at the
    size of a mid-size model's layers that is a tenth of the model, held to the end of the run.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (musl has no malloc_trim): its heap behaves differently anyway


def _storage_users(storage: torch.UntypedStorage) -> int:
    """How many tensors use `storage` (the Python storage object itself counts one, taken off)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(storage._cdata) - 1 if count is not None else -1


def _in_private_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one private mapping of a regular file."""
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                if low <= start and end <= high:
                    return len(fields) == 6 and fields[1].endswith("p") and fields[5].startswith("/")
    except OSError:
        return False
    return False
