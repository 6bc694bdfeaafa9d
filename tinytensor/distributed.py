"""The processes one model is split over (tensor parallelism), and the collectives between
them. A `Group` is the argument of the allreduce and allgather ops (ops/collective.py): alone,
they are the identity; under `mpirun` they go through MPI (mpi4py), between kernels.

    group = distributed.from_environment()   # one process, or this process's place under mpirun
"""
import os
import sys
import time

import numpy as np

from tinytensor.errors import UserError


class Group:
    """One process alone: rank 0 of 1, every collective the identity."""
    rank, size = 0, 1

    def allreduce(self, x: np.ndarray) -> np.ndarray:
        return x

    def allgather(self, x: np.ndarray, axis: int) -> np.ndarray:
        return x

    def broadcast(self, value):
        """Rank 0's value, on every rank (a picklable Python object)."""
        return value

    def from_rank_0(self, read):
        """What read() gives on rank 0 (which mpirun gives the input), on every rank; when it
        raises, the same error is raised on every rank, so that all of them end alike."""
        return read()

    def end_together(self, within: float) -> bool:
        """Whether every rank has come to its end within `within` seconds: then each may exit
        as usual (and mpirun passes on all they printed). Alone, always."""
        return True

    def abort(self, code: int):
        raise SystemExit(code)


SINGLE = Group()


class MPIGroup(Group):
    """The processes of an MPI communicator (COMM_WORLD by default)."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.mpi, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.endings = comm.Dup()  # its own, so that a rank waiting in a collective cannot match an ending

    def allreduce(self, x):
        total = np.array(x, dtype=np.float32, order="C")  # MPI sums in place, into a buffer of ours
        self.comm.Allreduce(self.mpi.IN_PLACE, total, op=self.mpi.SUM)
        return total

    def allgather(self, x, axis):
        x = np.ascontiguousarray(x)
        parts = np.empty((self.size, *x.shape), x.dtype)
        self.comm.Allgather(x, parts)
        return np.concatenate(list(parts), axis=axis)

    def broadcast(self, value):
        return self.comm.bcast(value, root=0)

    def from_rank_0(self, read):
        if self.rank == 0:
            try:
                outcome = (True, read())
            except Exception as e:
                outcome = (False, e)
        read_it, value = self.comm.bcast(outcome if self.rank == 0 else None, root=0)
        if not read_it:
            raise value
        return value

    def end_together(self, within):
        ended = self.endings.Ibarrier()
        deadline = time.monotonic() + within
        while not ended.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def abort(self, code: int):
        self.comm.Abort(code)  # ends every rank, so none waits forever in a collective

    def __repr__(self):
        return f"MPIGroup(rank {self.rank} of {self.size})"


class DistributedError(UserError, RuntimeError):
    """MPI was asked for (the process runs under mpirun) but cannot be used."""


# what mpirun/mpiexec tell each process they start: MPICH and Intel MPI (PMI), Open MPI
LAUNCHER = (("PMI_SIZE", "PMI_RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"))


def launched() -> tuple[int, int]:
    """(rank, size) as the launcher set them ((0, 1) when not run by mpirun): known before MPI
    is imported, so that only rank 0 speaks even when MPI cannot be used."""
    for size, rank in LAUNCHER:
        if os.environ.get(size, "").isdigit() and os.environ.get(rank, "").isdigit():
            return int(os.environ[rank]), int(os.environ[size])
    return 0, 1


def from_environment() -> Group:
    """SINGLE, or the MPI group when this process is one of several started by mpirun. mpi4py is
    imported only then, so one-process use never needs it."""
    _, size = launched()
    if size <= 1:
        return SINGLE
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:  # RuntimeError: mpi4py without an MPI library
        raise DistributedError(f"started by mpirun as {size} processes but MPI cannot be used ({e}): "
                               f"install it with `pip install mpi4py mpich` and run that environment's mpirun") from None
    group = MPIGroup(MPI.COMM_WORLD)
    if group.size != size:
        raise DistributedError(f"mpirun started {size} processes but mpi4py's MPI sees {group.size}: use the "
                               f"mpirun of the MPI that mpi4py uses (`python -m mpi4py --mpi-lib-version` says which)")
    _abort_on_uncaught(group)
    return group


def _abort_on_uncaught(group: Group) -> None:
    """An exception nothing caught ends every rank (as `python -m mpi4py` arranges), instead of
    one rank exiting while the others wait for it in a collective forever."""
    previous = sys.excepthook

    def hook(kind, value, trace):
        previous(kind, value, trace)
        sys.stderr.flush()
        group.abort(1)
    sys.excepthook = hook
