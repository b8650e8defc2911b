"""BN's closed form compiled from C (``bn_kernel.c``), for (N, C) float32 inputs on the CPU.

On the small MLP each torch operation costs 2-5 us of dispatch and allocation, as much as its
arithmetic; bnlab's BN written as torch operations is about twenty of them per layer and step,
torch's native layer one fused kernel each way. The same equations as one C loop nest per pass
bring ``norm=bn`` to within 10% of native speed per MLP step (1.27x as operations) without
giving up the paper's closed form.

The source is compiled on first use with the system's C compiler (``$CC``, else ``cc``; 0.2 s
on a 2-core machine) into ``$XDG_CACHE_HOME/bnlab`` (default ``~/.cache/bnlab``), named by the
source's hash, and loaded with ctypes. Without a compiler, or with ``BNLAB_BN_KERNEL=off``, BN
runs as torch operations: the same results to float rounding, slower on small inputs.
:func:`status` says which, and every run records it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("bn_kernel.c")
SWITCH = "BNLAB_BN_KERNEL"  # "off": always the torch operations
# portable code only: a cache in a home directory shared by a cluster's nodes must run on all
FLAGS = ["-O3", "-std=c99", "-shared", "-fPIC"]
# The passes run on one thread, where the per-operation cost they save is what matters: up to
# this many values (256 x 256). On 2 cores the kernel and the torch operations take the same
# time at 256 x 256 and above (both about 2x native); with more cores the operations win.
MAX_ELEMENTS = 1 << 16

_library: ctypes.CDLL | None = None
_reason: str | None = None  # why there is no library; None until the first attempt


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnlab"


def _build(compiler: str) -> Path:
    """The compiled library, built now unless the cache holds this source's build already."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode()).hexdigest()
    target = _cache_dir() / f"bn_kernel-{platform.machine()}-{digest[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # compiled under a private name and renamed: concurrent runs of a sweep never load half a file
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
            raise OSError(f"{compiler} failed: {lines[-1]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _load() -> ctypes.CDLL | None:
    global _library, _reason
    if _reason is not None or _library is not None:
        return _library
    if os.environ.get(SWITCH, "").lower() in ("0", "off", "false", "no"):
        _reason = f"off ({SWITCH}={os.environ[SWITCH]})"
        return None
    try:
        library = ctypes.CDLL(str(_build(os.environ.get("CC") or "cc")))
    except OSError as err:  # no compiler, a failed build, a library the loader refuses
        _reason = f"unavailable ({err})"
        return None
    p, n, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    library.bn_forward.argtypes = [p, p, p, n, n, d, p, p, p, p, p]
    library.bn_backward.argtypes = [p, p, p, p, n, n, p, p, p]
    library.bn_running_update.argtypes = [p, p, p, p, p, n, n, d]
    library.bn_forward.restype = library.bn_backward.restype = ctypes.c_int
    library.bn_running_update.restype = None
    _library, _reason = library, ""
    return library


def status() -> str:
    """``compiled``, or why BN runs as torch operations."""
    return "compiled" if _load() is not None else str(_reason)


def serves(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """Whether the compiled passes can normalize x: (N, C) float32 on the CPU, contiguous, at
    most :data:`MAX_ELEMENTS` values, with per-feature parameters alike, outside
    ``torch.compile`` (which fuses the operations itself)."""
    return x.dim() == 2 and x.numel() <= MAX_ELEMENTS and _float32_cpu(x, weight, bias) and _ready()


# Checked twice per BN layer and step, so written for speed (~1.5 us, not 4): ``is_cpu`` and
# ``dtype is`` rather than ``device.type ==``, a loop rather than a generator.
def _float32_cpu(*tensors: Tensor) -> bool:
    for t in tensors:
        if not (t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()):
            return False
    return True


def _ready() -> bool:
    """Outside ``torch.compile``, with the library loaded."""
    return not torch.compiler.is_compiling() and (_library is not None or _load() is not None)


def _check(code: int) -> None:
    if code != 0:
        raise MemoryError("bnlab's BN kernel could not allocate its workspace")


def forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, ...]:
    """(y, x_hat, mean, squares, inv_std) of x, which :func:`serves` accepted; the last three
    are (C,): the batch mean, sum((x - mean)^2) and 1 / sqrt(var_B + eps)."""
    m, c = x.shape
    y, x_hat = torch.empty_like(x), torch.empty_like(x)
    mean, squares, inv_std = x.new_empty(c), x.new_empty(c), x.new_empty(c)
    _check(_library.bn_forward(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), m, c, eps, y.data_ptr(),
                               x_hat.data_ptr(), mean.data_ptr(), squares.data_ptr(), inv_std.data_ptr()))
    return y, x_hat, mean, squares, inv_std


def backward(grad_y: Tensor, x_hat: Tensor, inv_std: Tensor, weight: Tensor,
             input_grad: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx, dgamma, dbeta) from the forward pass's x_hat and inv_std; dx only if ``input_grad``."""
    grad_y = grad_y.contiguous()
    m, c = grad_y.shape
    grad_x = torch.empty_like(grad_y) if input_grad else None
    # separate tensors, not rows of one: autograd may adopt them as the parameters' .grad
    grad_weight, grad_bias = grad_y.new_empty(c), grad_y.new_empty(c)
    _check(_library.bn_backward(grad_y.data_ptr(), x_hat.data_ptr(), inv_std.data_ptr(), weight.data_ptr(),
                                m, c, grad_x.data_ptr() if input_grad else None, grad_weight.data_ptr(),
                                grad_bias.data_ptr()))
    return grad_x, grad_weight, grad_bias


def running_update(mean: Tensor, squares: Tensor, m: int, running_mean: Tensor, running_var: Tensor,
                   num_batches_tracked: Tensor, momentum: float | None) -> None:
    """BN's running estimates updated in place from one batch's mean and sum of squared deviations
    (:func:`bnlab.norms.batchnorm.record_batch`); the caller checks :func:`updates`."""
    _library.bn_running_update(mean.data_ptr(), squares.data_ptr(), running_mean.data_ptr(),
                               running_var.data_ptr(), num_batches_tracked.data_ptr(), mean.numel(), m,
                               -1.0 if momentum is None else momentum)


def updates(mean: Tensor, squares: Tensor, running_mean: Tensor, running_var: Tensor,
            num_batches_tracked: Tensor) -> bool:
    """Whether :func:`running_update` can update these buffers from these statistics."""
    return (_float32_cpu(mean, squares, running_mean, running_var) and mean.numel() == running_mean.numel()
            and num_batches_tracked.numel() == 1 and num_batches_tracked.dtype is torch.int64
            and num_batches_tracked.is_cpu and _ready())
