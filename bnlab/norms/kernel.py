"""The norms' closed forms as compiled torch operators (``norm_ops.cpp`` around ``bn_kernel.c``
and ``gn_kernel.c``), for (N, C) float32 inputs on the CPU: BN (with noisy BN's BN), batch
renormalization, and group and layer normalization.

On the small MLP each torch operation costs 2-5 us of dispatch and allocation, as much as its
arithmetic; bnlab's BN written as torch operations is about twenty of them per layer and step,
torch's native layer one fused kernel each way. The same equations as one C loop nest per pass,
called from an operator whose autograd node is C++ too, make a ``norm=bn`` MLP step as fast as
with torch's layer (a Python ``autograd.Function`` around the same loops, bnlab's path before,
cost ~14% more per step).

The operators are compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``;
C++20, torch's headers from its wheel; ~16 s on a 2-core machine, once per torch version) into
``$XDG_CACHE_HOME/bnlab`` (default ``~/.cache/bnlab``), named by a hash of the sources, the
compiler, its flags and torch's version, and loaded with ``torch.ops.load_library``. Processes
that start together wait for one build (a lock in the cache). Without a compiler, or with
``BNLAB_BN_KERNEL=off``, the norms run as torch operations: the same results to float
rounding, slower on small inputs. :func:`status` says which, and every run records it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

SOURCES = [Path(__file__).with_name(name) for name in ("norm_ops.cpp", "bn_kernel.c", "gn_kernel.c")]
SWITCH = "BNLAB_BN_KERNEL"  # "off": always the torch operations
TORCH_DIR = Path(torch.__file__).parent
# portable code only: a cache in a home directory shared by a cluster's nodes must run on all;
# torch's headers need C++20, and the library must use torch's C++ ABI
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
         f"-I{TORCH_DIR / 'include'}", f"-L{TORCH_DIR / 'lib'}"]
# the torch libraries it calls, found where torch keeps them (macOS's loader needs the rpath)
LIBS = ["-lc10", "-ltorch_cpu", f"-Wl,-rpath,{TORCH_DIR / 'lib'}"]
# The loops run on one thread, the torch operations on all: up to this many values (1024 x 512).
# A layer's forward and backward on 2 cores took 0.60-0.77 of the operations' time from 60 x 100
# to 1024 x 512 (1 or 2 threads, 15 rounds); larger inputs, and more cores, were not measured.
MAX_ELEMENTS = 1 << 19

_loaded = False
_reason: str | None = None  # why there is no operator; None until the first attempt


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bnlab"


def _build(compiler: str) -> Path:
    """The compiled library, built now unless the cache holds this build already."""
    command = " ".join([compiler, *FLAGS, *LIBS, torch.__version__])
    key = b"".join(p.read_bytes() for p in SOURCES) + command.encode()
    target = _cache_dir() / f"norm_ops-{platform.machine()}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # one build at a time (a sweep's jobs start together); the others wait, then load it
    with open(target.parent / ".build.lock", "w") as lock:
        with contextlib.suppress(OSError):  # a file system without locks (old NFS): build anyway
            fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        if sys.stderr.isatty():
            print("bnlab: compiling the norms' operators (once per torch version, ~15 s)", file=sys.stderr)
        # compiled under a private name and renamed: a run never loads half a file
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCES[0]), *LIBS],
                                    capture_output=True, text=True)
            if result.returncode != 0:  # say the first error, else the last line, else the status
                lines = result.stderr.strip().splitlines()
                errors = [line for line in lines if "error" in line]
                reason = (errors or lines[-1:] or [f"exit status {result.returncode}"])[0]
                raise OSError(f"{compiler} failed: {reason}")
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return target


def _load() -> bool:
    global _loaded, _reason
    if _reason is not None or _loaded:
        return _loaded
    if os.environ.get(SWITCH, "").lower() in ("0", "off", "false", "no"):
        _reason = f"off ({SWITCH}={os.environ[SWITCH]})"
        return False
    try:
        torch.ops.load_library(str(_build(os.environ.get("CXX") or "c++")))
    except (OSError, RuntimeError) as err:  # no compiler, a failed build, a library torch refuses
        _reason = f"unavailable ({err})"
        return False
    _loaded, _reason = True, ""
    return True


def status() -> str:
    """``compiled``, or why the norms run as torch operations."""
    return "compiled" if _load() else str(_reason)


def serves(x: Tensor, *per_feature: Tensor, counter: Tensor | None = None) -> bool:
    """Whether the operators can normalize x: (N, C) float32 on the CPU, contiguous, at most
    :data:`MAX_ELEMENTS` values, with its ``per_feature`` tensors (parameters, running
    estimates) alike and of C values, a step ``counter``, if any, an int64 CPU scalar, outside
    ``torch.compile`` (which fuses the operations itself)."""
    if x.dim() != 2 or x.numel() > MAX_ELEMENTS or not _float32_cpu(x):
        return False
    width = x.shape[1]
    for t in per_feature:
        if not (_float32_cpu(t) and t.numel() == width):
            return False
    if counter is not None and not (counter.dtype is torch.int64 and counter.numel() == 1 and counter.is_cpu):
        return False
    return not torch.compiler.is_compiling() and (_loaded or _load())


# Checked for every tensor of every layer and step, so written for speed: ``is_cpu`` and
# ``dtype is`` rather than ``device.type ==``.
def _float32_cpu(t: Tensor) -> bool:
    return t.dtype is torch.float32 and t.is_cpu and t.is_contiguous()


def batch_norm_train(x: Tensor, weight: Tensor, bias: Tensor, running: tuple[Tensor, Tensor, Tensor] | None,
                     momentum: float | None, eps: float) -> Tensor:
    """Train-mode BN of x, which :func:`serves` accepted; ``running`` (mean, variance, counter),
    if given, updated in place with ``momentum`` (None: the cumulative average)."""
    mean, var, tracked = running if running is not None else (None, None, None)
    return torch.ops.bnlab.batch_norm_train(x, weight, bias, mean, var, tracked,
                                            -1.0 if momentum is None else momentum, eps)


def batch_renorm_train(x: Tensor, weight: Tensor, bias: Tensor, running: tuple[Tensor, Tensor, Tensor],
                       limits: tuple[float, float], momentum: float, eps: float, update: bool) -> Tensor:
    """Train-mode batch renormalization of x, which :func:`serves` accepted, with the limits
    (r_max, d_max) and the ``running`` (mean, sigma, counter), updated in place if ``update``."""
    mean, std, tracked = running
    return torch.ops.bnlab.batch_renorm_train(x, weight, bias, mean, std, tracked, *limits, momentum, eps,
                                              update)


def group_norm(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    """Group normalization of x (layer normalization: ``groups=1``), which :func:`serves` accepted."""
    return torch.ops.bnlab.group_norm(x, weight, bias, groups, eps)
