"""`sharedtest://`: a store URL backed by local files, so that data-parallel ranks (separate
processes) share it, as they share an S3 bucket; `memory://` is per process. Its exclusive create is
the local one (`locking.py`)."""

from __future__ import annotations

import fsspec
from fsspec.implementations.local import LocalFileSystem

from diffquant.artifacts import locking

PROTOCOL = "sharedtest"


class SharedTestFileSystem(LocalFileSystem):
    protocol = (PROTOCOL,)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return LocalFileSystem._strip_protocol(path[len(PROTOCOL) + 3:] if path.startswith(f"{PROTOCOL}://") else path)


def register() -> None:
    fsspec.register_implementation(PROTOCOL, SharedTestFileSystem, clobber=True)
    locking.EXCLUSIVE_CREATE[PROTOCOL] = locking._create_local
