"""One training run over several processes, as started by ``torchrun`` (torch.distributed).

torchrun starts one process per replica and tells each its place through the environment:
``RANK`` and ``WORLD_SIZE`` (global), ``LOCAL_RANK`` (on this machine), ``MASTER_ADDR`` and
``MASTER_PORT`` (the rendezvous). Every process runs ``bnlab train`` with the same overrides;
this module gives them one process group, one run directory and one model wrapper:

- the process group uses gloo for CPU tensors and NCCL for CUDA tensors (each process trains
  on ``cuda:LOCAL_RANK``);
- rank 0 resolves the run directory (``hydra.run.dir``, whose ``${now:}`` could differ by a
  second between processes) and sends it to the others, which add it to their overrides and
  write no ``.hydra/`` of their own (:func:`agree_on_run_dir`);
- the model is wrapped in ``DistributedDataParallel`` for the training step only: gradients
  are averaged over the replicas, each of which sees its contiguous share of the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from bnlab.errors import UserError


@dataclass(frozen=True)
class Replica:
    """This process's place among the replicas (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run's files; the others only train."""
        return self.rank == 0


def launched_by_torchrun(environ: os._Environ | dict | None = None) -> bool:
    """True in a process started by torchrun (even with one process: the same code path)."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env


def replica(environ: os._Environ | dict | None = None) -> Replica:
    """Rank, world size and local rank from torchrun's environment variables."""
    env = os.environ if environ is None else environ
    if not launched_by_torchrun(env):
        return Replica()
    return Replica(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))


def init_process_group() -> Replica:
    """Join torchrun's process group (once per process); a no-op outside torchrun."""
    me = replica()
    if launched_by_torchrun() and not dist.is_initialized():
        # Collectives pick the backend by the tensor's device: one group serves CPU and CUDA runs.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, rank=me.rank, world_size=me.world_size)
    return me


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """Under torchrun a CUDA run uses GPU ``LOCAL_RANK``, the one torchrun gave this process."""
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    local = torch.device("cuda", replica().local_rank)
    if local.index >= torch.cuda.device_count():
        raise UserError(f"torchrun started local rank {local.index} but this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s): use --nproc_per_node="
                        f"{torch.cuda.device_count()} or device=cpu")
    torch.cuda.set_device(local)
    return local


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` as rank ``src`` has it, on every rank (sent as a CPU tensor, through gloo)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over the replicas, in place; unchanged outside a process group."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)``: averages gradients over replicas in ``backward``."""
    from torch.nn.parallel import DistributedDataParallel

    if not is_distributed():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ---------------------------------------------------------------- one run directory for all ranks
def _resolve_run_dir(argv: list[str], pattern: str) -> str:
    """``hydra.run.dir`` of this command line (the last override, or ``pattern``), resolved."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    given = [a for a in argv if a.split("=", 1)[0] == "hydra.run.dir"]
    if given:
        pattern = str(OverridesParser.create().parse_override(given[-1]).value())
    setup_globals()  # Hydra's ${now:} resolver
    try:
        return str(OmegaConf.create({"dir": pattern}).dir)
    except OmegaConfBaseException as err:
        raise UserError(f"hydra.run.dir={pattern!r} cannot be resolved before Hydra starts, as "
                        "torchrun needs: use ${now:...} and ${oc.env:...} only") from err


def agree_on_run_dir(argv: list[str], pattern: str) -> list[str]:
    """Overrides that put every rank in the run directory rank 0 resolved from ``argv``.

    ``pattern`` is the configured ``hydra.run.dir`` (train.yaml's), used when ``argv`` sets none.
    Ranks other than 0 write no ``.hydra/`` and log to stdout only, so the directory holds one
    copy of Hydra's files and one ``train.log``.
    """
    if any(a in ("-m", "--multirun") for a in argv):
        raise UserError("torchrun runs one training run over several processes; a sweep (-m) "
                        "goes through a launcher instead (hydra/launcher=joblib or submitit_slurm)")
    me = init_process_group()
    run_dir, error = None, None
    if me.is_writer:
        try:
            run_dir = _resolve_run_dir(argv, pattern)
        except UserError as err:
            error = str(err)  # every rank must leave, not wait for a directory forever
    run_dir, error = broadcast_object((run_dir, error))
    if error is not None:
        raise UserError(error)
    quoted = run_dir.replace("\\", "\\\\").replace("'", "\\'")
    extra = [f"hydra.run.dir='{quoted}'"]
    if not me.is_writer:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return [a for a in argv if a.split("=", 1)[0] != "hydra.run.dir"] + extra
