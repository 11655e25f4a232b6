"""Whether this process is one rank of an MPI job, and MPI itself (mpi4py), loaded only then.

Imported by the CLI before NumPy (this module imports neither NumPy nor, unless launched under
MPI, mpi4py), so that one process runs exactly as without MPI and the thread count chosen here
reaches BLAS before it loads.
"""
import os

from charlstm.errors import UserError

INSTALL = "pip install 'charlstm[mpi]'"
# Set by the launchers: MPICH/Intel MPI's hydra and Slurm's srun (PMI_SIZE), Open MPI's mpirun
# (OMPI_COMM_WORLD_SIZE), PMIx launchers (PMIX_RANK, with no size beside it).
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def launched():
    """True when a launcher started this process as one of several ranks (mpiexec -n N, N > 1).
    A job of one rank (`mpiexec -n 1`) runs as a plain process."""
    for name in SIZE_VARIABLES:
        if name in os.environ:
            return os.environ[name].strip() not in ("", "0", "1")
    return "PMIX_RANK" in os.environ


def world():
    """MPI's COMM_WORLD, importing mpi4py (which initialises MPI). Without mpi4py, or with mpi4py
    but no MPI library, rank 0 says in one line what to install and every rank exits 1."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:  # no MPI library: RuntimeError, not ImportError
        if _rank() not in ("", "0"):  # rank 0 alone says it, so the job prints one line
            raise SystemExit(1) from None
        if isinstance(e, ImportError):
            raise UserError(f"this process was started by an MPI launcher (mpiexec, srun) but mpi4py is not "
                            f"installed; install it with: {INSTALL}") from None
        raise UserError(f"mpi4py cannot load an MPI library ({' '.join(str(e).split())}); install one "
                        f"with: {INSTALL}") from None
    return MPI.COMM_WORLD


def _rank():
    return next((os.environ[name] for name in RANK_VARIABLES if name in os.environ), "").strip()


def local_ranks(comm):
    """How many ranks of the job run on this machine (MPI's shared-memory split of the job)."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def threads_per_rank(comm):
    """The default --threads of a rank: this machine's cores shared among the ranks placed on it."""
    return max(1, (os.cpu_count() or 1) // local_ranks(comm))
