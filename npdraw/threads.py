"""What the launcher says about this process, read before NumPy loads (npdraw/__init__.py
runs it first, so it is NumPy-free): how many ranks it started, and the BLAS thread count
of each."""
from __future__ import annotations

import os

# the rank count as MPICH's Hydra (and Intel MPI, srun's PMI-2) and Open MPI's mpirun set it
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def launched_ranks(environ=None) -> int:
    """How many ranks the launcher (mpiexec, mpirun, srun) says it started; 1 without one."""
    environ = os.environ if environ is None else environ
    for name in SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    if environ.get("SLURM_STEP_ID", "").isdigit() and \
            environ.get("SLURM_STEP_NUM_TASKS", "").isdigit():
        return int(environ["SLURM_STEP_NUM_TASKS"])
    return 1


def share_cores_between_ranks(environ=os.environ) -> None:
    """Under mpiexec or srun the ranks on one machine share its cores: each rank's BLAS
    gets its share, one thread on two cores with two ranks, unless the user set the
    thread count. It must be set before NumPy loads."""
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit() and "SLURM_STEP_ID" in environ:
        threads = int(environ["SLURM_CPUS_PER_TASK"])
    else:
        local = next((environ[v] for v in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
                      if environ.get(v, "").isdigit()), None)
        if local is None or int(local) <= 1:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
        threads = max(1, cores // int(local))
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        environ.setdefault(variable, str(threads))
