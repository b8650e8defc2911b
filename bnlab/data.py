"""Data sets as resident tensors on the training device, and a seeded batch stream.

Each split is decoded once (uint8 -> float, standardized with the training split's per-channel
mean and std) and kept on the device; an epoch is a ``torch.randperm`` and index slices, so the
hot loop has no per-sample Python, no DataLoader and no PIL.

Files are the originals: torchvision's classes download and verify them into ``data.root`` when
a network is reachable; bnlab parses them itself (IDX for MNIST/Fashion-MNIST, the python pickle
batches for CIFAR-10), so tiny test files in those formats take the same path as real data.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import secrets
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bnlab.errors import DataError, UserError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
OFFLINE_HINT = ("data=digits always works offline; data=fashion_mnist works offline with "
                "Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)")


@dataclass
class Split:
    x: Tensor  # float32 (N, C, H, W) on the device
    y: Tensor  # int64 (N,) class labels, or float32 (N, K) regression targets, on the device

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int  # 0 for a regression task
    task: str = "classification"  # classification (cross-entropy) | regression (MSE)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_outputs(self) -> int:
        """Width of the network's last layer: one logit per class, or one unit per target."""
        return self.num_classes if self.task == "classification" else self.train.y.shape[1]


@dataclass
class RawSplits:
    """uint8 images (N, C, H, W) and int64 labels, before scaling and standardization."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    max_value: float  # 255 for 8-bit images, 16 for the UCI digits
    task: str = "classification"  # regression: y are float targets, not labels


# ---------------------------------------------------------------- reachability and download
def _reachable(url: str, timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of hanging in urllib."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download(name: str, where: Path, files: list[str], urls: list[str],
              fetch: Callable[[], object], allowed: bool) -> None:
    missing = f"{name}: files missing in {where} ({', '.join(files)}, or their .gz originals)" \
        if name != "cifar10" else f"{name}: files missing in {where} ({', '.join(files)})"
    if not allowed:
        raise DataError(f"{missing}; data.download=false. Put the original files there. {OFFLINE_HINT}")
    if not any(_reachable(u) for u in urls):
        raise DataError(f"{missing} and no network to download them. Put the original files "
                        f"there, or set data.root (or $BNLAB_DATA). {OFFLINE_HINT}")
    try:
        fetch()
    except Exception as err:  # urllib, tarfile and md5 failures all mean the same to a user
        raise DataError(f"{name}: download into {where} failed ({err}). {OFFLINE_HINT}") from err


def _writable_root(root: Path) -> Path:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"data.root={root} cannot be created ({err.strerror})") from err
    return root


# ---------------------------------------------------------------- MNIST and Fashion-MNIST (IDX)
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def read_idx(path: Path) -> Tensor:
    """Parse an IDX file (LeCun's format: magic 0x0000 | dtype 0x08 | ndim, big-endian sizes)."""
    data = path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (wrong magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path}: truncated or padded ({len(data)} bytes, the header says {expected})")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=header).copy()).view(*shape)


def _idx_dataset(name: str, folder: str, root: Path, download: bool) -> RawSplits:
    raw = root / folder / "raw"
    # Where the original .gz files may be: put there by the user (or torchvision's download),
    # or Debian's package for Fashion-MNIST.
    originals = [raw, DEBIAN_FASHION_MNIST] if folder == "FashionMNIST" else [raw]
    have = lambda: all((raw / f).is_file() for f in IDX_FILES)  # noqa: E731
    for source in originals:
        if not have():
            _decompress_idx(source, raw)
    if not have():
        import torchvision.datasets as tvd  # only to download: its import costs ~2 s of start-up

        cls = getattr(tvd, folder)
        _download(name, raw, IDX_FILES, list(cls.mirrors),
                  lambda: cls(str(_writable_root(root)), train=True, download=True), download)
    train_x, train_y, test_x, test_y = (_read_idx_checked(raw, f, originals) for f in IDX_FILES)
    for images, labels, split in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"{name}: {raw}/{split}-* images {tuple(images.shape)} do not match "
                            f"labels {tuple(labels.shape)}")
    return RawSplits(train_x.unsqueeze(1), train_y.long(), test_x.unsqueeze(1), test_y.long(), 255.0)


def _decompress_idx(source: Path, raw: Path) -> None:
    """Decompress the four original ``.gz`` files from ``source`` into ``raw``, if all are there
    (each one whose decompressed copy is missing).

    Debian's Fashion-MNIST files hold the real data but not torchvision's md5s (their gzip
    headers lack the file name), so torchvision's own download check would reject them.
    """
    sources = [source / f"{f}.gz" for f in IDX_FILES]
    if not all(s.is_file() for s in sources):
        return
    for src in sources:
        if not (raw / src.stem).is_file():
            _decompress(src, raw / src.stem)


def _decompress(src: Path, target: Path) -> None:
    """Decompress ``src`` into ``target`` through a temporary name of this process's own and a
    rename: processes that prepare the same data set at once never write one file together,
    and whichever renames last leaves a whole file, as every other one would have."""
    partial = target.with_name(f"{target.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(src, "rb") as fin, open(partial, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(partial, target)
    except (OSError, EOFError) as err:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise DataError(f"cannot decompress {src} into {target.parent} ({err}); "
                        "set data.root to a writable folder or replace the files") from err


def _read_idx_checked(raw: Path, name: str, originals: list[Path]) -> Tensor:
    """``raw/name`` read (its header and length checked); a damaged copy (a decompression cut
    short, a full disk) is decompressed again from its original ``.gz`` when one is there."""
    try:
        return read_idx(raw / name)
    except DataError:
        source = next((s / f"{name}.gz" for s in originals if (s / f"{name}.gz").is_file()), None)
        if source is None:
            raise
    _decompress(source, raw / name)
    return read_idx(raw / name)  # the original itself may be damaged: its error stands


# ---------------------------------------------------------------- CIFAR-10 (python pickle batches)
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_FOLDER = "cifar-10-batches-py"  # what the original archive unpacks to (torchvision's too)


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python batch: a pickled dict with b'data' (N, 3072) uint8 and b'labels'."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
        images = data.reshape(-1, 3, 32, 32)
    except Exception as err:  # unpickling garbage raises anything from EOFError to KeyError
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels)


def _cifar10(root: Path, download: bool) -> RawSplits:
    folder = root / CIFAR_FOLDER
    files = CIFAR_TRAIN + CIFAR_TEST
    if not all((folder / f).is_file() for f in files):
        import torchvision.datasets as tvd  # only to download: its import costs ~2 s of start-up

        _download("cifar10", folder, files, [tvd.CIFAR10.url],
                  lambda: tvd.CIFAR10(str(_writable_root(root)), train=True, download=True), download)
    train = [read_cifar_batch(folder / f) for f in CIFAR_TRAIN]
    test_x, test_y = read_cifar_batch(folder / CIFAR_TEST[0])
    return RawSplits(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]),
                     test_x, test_y, 255.0)


# ---------------------------------------------------------------- UCI digits (scikit-learn)
def _digits(root: Path, download: bool) -> RawSplits:
    """scikit-learn's bundled copy of the UCI digits, read from its CSV without importing sklearn
    (whose import costs about a second of every run's start-up)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("digits: scikit-learn is not installed (pip install scikit-learn)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # 1,797 rows: 64 pixels (0..16), label
    images = torch.from_numpy(table[:, :64].astype(np.uint8)).view(-1, 1, 8, 8)
    labels = torch.from_numpy(table[:, 64])
    # A fixed 80/20 split, the same on every machine.
    order = torch.from_numpy(np.random.RandomState(0).permutation(len(labels)))
    n_train = int(0.8 * len(labels))
    tr, te = order[:n_train], order[n_train:]
    return RawSplits(images[tr], labels[tr], images[te], labels[te], 16.0)


# ---------------------------------------------------------------- a linear regression (synthetic)
LINEAR_DIM, LINEAR_TRAIN, LINEAR_TEST = 10, 1000, 1000


def _linear(root: Path, download: bool) -> RawSplits:
    """y = A x with x ~ N(0, I_10) and one fixed A, A_ij ~ N(0, 1) (Santurkar et al. 2018's DLN task).

    Seeded (seed 0), so every machine and every run sees the same A and the same splits.
    Shaped (N, 10, 1, 1) like a 10-channel 1x1 image, so the models' inputs stay (C, H, W).
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(LINEAR_DIM, LINEAR_DIM, generator=g)
    x = torch.randn(LINEAR_TRAIN + LINEAR_TEST, LINEAR_DIM, generator=g)
    y = x @ a.T
    x = x.view(-1, LINEAR_DIM, 1, 1)
    return RawSplits(x[:LINEAR_TRAIN], y[:LINEAR_TRAIN], x[LINEAR_TRAIN:], y[LINEAR_TRAIN:], 1.0,
                     task="regression")


LOADERS: dict[str, Callable[[Path, bool], RawSplits]] = {
    "mnist": lambda root, dl: _idx_dataset("mnist", "MNIST", root, dl),
    "fashion_mnist": lambda root, dl: _idx_dataset("fashion_mnist", "FashionMNIST", root, dl),
    "cifar10": _cifar10,
    "digits": _digits,
    "linear": _linear,
}


def load_dataset(cfg, device: torch.device) -> Dataset:
    """Load ``cfg.name`` from ``cfg.root`` as resident, standardized tensors on ``device``."""
    root = Path(os.path.expanduser(str(cfg.root)))
    raw = LOADERS[cfg.name](root, bool(cfg.download))
    if cfg.binarize:
        if raw.task != "classification":
            raise UserError(f"data.binarize=true is not valid with data={cfg.name}: its inputs "
                            "are not pixels")
        train_x, test_x = (binarize(x, raw.max_value).to(device) for x in (raw.train_x, raw.test_x))
    else:
        scale = 1.0 / raw.max_value
        train_x = raw.train_x.to(device=device, dtype=torch.float32).mul_(scale)
        test_x = raw.test_x.to(device=device, dtype=torch.float32).mul_(scale)
    if cfg.normalize:
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        train_x.sub_(mean).div_(std)
        test_x.sub_(mean).div_(std)
    if raw.task == "regression":
        num_classes = 0
    else:
        num_classes = int(max(raw.train_y.max(), raw.test_y.max())) + 1
    return Dataset(cfg.name, Split(train_x, raw.train_y.to(device)),
                   Split(test_x, raw.test_y.to(device)), num_classes, raw.task)


def binarize(x: Tensor, max_value: float) -> Tensor:
    """Binary pixels, as Ioffe & Szegedy's Fig. 1 network saw MNIST: 1.0 where x > max / 2, else 0.0.

    The paper says only "a 28x28 binary image as input"; the threshold at half the maximum is ours.
    """
    return (x > max_value / 2).float()


# ---------------------------------------------------------------- batches
def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of every image, on x's device."""
    n, c, h, w = x.shape
    flip = torch.rand(n, generator=generator, device=generator.device) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    shift = torch.randint(0, 2 * pad + 1, (2, n), generator=generator,
                          device=generator.device).to(x.device)
    rows = (shift[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (shift[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


GPU_CHUNK_ROWS = 4096  # rows of one gather on a GPU, where each gather is a kernel launch
CPU_CHUNK_BYTES = 2 << 20  # bytes of one gather on a CPU: a chunk that stays in cache until used
# Rows the grouped sampler plans per draw. Unlike a gather's size, this decides which batches a
# seed gives, so it is the same on every device.
PLAN_ROWS = 4096


class BatchStream:
    """Shuffled batches of a resident split: an epoch is one seeded ``randperm``.

    The rows of the next few batches are gathered with one ``index_select`` (``chunk_rows``
    at most) and handed out as views: one large gather costs far less than many small ones on
    a GPU. On a CPU the chunk is sized to stay in cache until its batches are used
    (:data:`CPU_CHUNK_BYTES`): with 4,096 Fashion-MNIST rows (12.8 MB) the MLP's trainer made
    2.9% fewer steps/s than with 600 (1.9 MB), paired in one process.
    What a batch holds depends only on the permutation and the position, so a stream restored
    from ``state_dict`` continues with exactly the batches the original would have given.

    Under torch.distributed each rank takes its contiguous share of the same global batch,
    so the union of the ranks' batches is exactly the one-process batch.
    """

    def __init__(self, split: Split, batch_size: int, seed: int, augment: bool = False,
                 rank: int = 0, world_size: int = 1, chunk_rows: int | None = None) -> None:
        self.split, self.batch_size, self.augment = split, batch_size, augment
        self.rank, self.world_size = rank, world_size
        if chunk_rows is None:
            row_bytes = split.x[:1].numel() * split.x.element_size()
            chunk_rows = GPU_CHUNK_ROWS if split.x.is_cuda else CPU_CHUNK_BYTES // max(1, row_bytes)
        self.chunk_batches = max(1, chunk_rows // batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        device = split.x.device
        self.aug_generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.perm: Tensor | None = None
        self.pos = 0  # index in perm of the next batch's first row
        self.epoch = 0
        self._chunk: tuple[Tensor, Tensor] | None = None
        self._chunk_start = self._chunk_end = 0  # the perm positions the chunk covers

    def _gather(self) -> None:
        """Gather the rows of the next whole batches of this epoch (this rank's share of each)."""
        n_batches = min(self.chunk_batches, (len(self.split) - self.pos) // self.batch_size)
        end = self.pos + n_batches * self.batch_size
        idx = self.perm[self.pos: end]
        if self.world_size > 1:
            idx = idx.view(n_batches, self.world_size, -1)[:, self.rank].reshape(-1)
        self._chunk = (self.split.x.index_select(0, idx), self.split.y.index_select(0, idx))
        self._chunk_start, self._chunk_end = self.pos, end

    def __next__(self) -> tuple[Tensor, Tensor]:
        n = len(self.split)
        if self.perm is None or self.pos + self.batch_size > n:  # drop the ragged tail
            self.perm = torch.randperm(n, generator=self.generator).to(self.split.x.device)
            self.pos = 0
            self.epoch += 1
            self._chunk = None
        if self._chunk is None or not self._chunk_start <= self.pos < self._chunk_end:
            self._gather()
        share = self.batch_size // self.world_size
        offset = (self.pos - self._chunk_start) // self.world_size
        x, y = (t[offset: offset + share] for t in self._chunk)
        self.pos += self.batch_size
        if self.augment:
            x = augment_batch(x, self.aug_generator)
        return x, y

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "aug_generator": self.aug_generator.get_state(),
                "perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.aug_generator.set_state(state["aug_generator"])
        perm = state["perm"]
        self.perm = None if perm is None else perm.to(self.split.x.device)
        self.pos, self.epoch = state["pos"], state["epoch"]
        self._chunk = None


class GroupedBatchStream:
    """Non-i.i.d. batches (Ioffe 2017, Sec. 4.3): K distinct labels, m = batch_size / K examples each.

    Every batch draws its K labels uniformly, without replacement, from the classes of the split
    (the paper: 16 of ImageNet's 1,000 labels, 2 images each, batches of 32); the m examples of a
    label are the next m of that class's queue, a seeded permutation of the class (its last
    n_c mod m examples dropped), refilled with a fresh permutation when it runs short. So every
    example of a class is used once before any is used again, and no batch repeats an example.

    Batches are planned a chunk at a time (``chunk_rows`` rows at most): one draw of the chunk's
    labels, one slice of each class's queue, one ``index_select`` of the rows; a Python loop runs
    over the classes only. What a batch holds depends only on the generator, the queues and the
    plan, all in ``state_dict``, so a restored stream continues with exactly the same batches.
    Under torch.distributed each rank takes its contiguous share of the same global batch.
    """

    def __init__(self, split: Split, batch_size: int, labels_per_batch: int, seed: int,
                 augment: bool = False, rank: int = 0, world_size: int = 1,
                 chunk_rows: int = PLAN_ROWS) -> None:
        labels = split.y.cpu()
        counts = torch.bincount(labels)
        self.k, self.m = labels_per_batch, batch_size // labels_per_batch
        if self.m * self.k != batch_size or self.k > len(counts) or int(counts.min()) < self.m:
            raise ValueError(f"{len(counts)} classes of at least {int(counts.min())} examples cannot "
                             f"make batches of {labels_per_batch} labels x {self.m} examples")
        self.split, self.batch_size, self.augment = split, batch_size, augment
        self.rank, self.world_size = rank, world_size
        self.chunk_batches = max(1, chunk_rows // batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.aug_generator = torch.Generator(device=split.x.device).manual_seed(seed + 1)
        # Each class's example indices (CPU), and what is left of its current permutation(s).
        self.members = list(torch.split(torch.argsort(labels, stable=True), counts.tolist()))
        self.queues = [torch.empty(0, dtype=torch.long) for _ in self.members]
        self.plan: Tensor | None = None  # (chunk_batches, batch_size) row indices of this chunk
        self.row = 0  # the plan's next batch
        self.batches = 0  # handed out so far
        self._chunk: tuple[Tensor, Tensor] | None = None

    @property
    def epoch(self) -> int:
        """Passes over the split so far (a pass: as many rows as the split has), from 1."""
        return self.batches * self.batch_size // len(self.split) + 1

    def _plan_chunk(self) -> None:
        n_classes, n = len(self.members), self.chunk_batches
        labels = torch.rand(n, n_classes, generator=self.generator).argsort(1)[:, :self.k]
        slots = labels.reshape(-1)  # the chunk's groups in batch order, by label
        plan = torch.empty(len(slots), self.m, dtype=torch.long)
        for c, members in enumerate(self.members):
            where = (slots == c).nonzero().squeeze(1)
            need = len(where) * self.m
            while len(self.queues[c]) < need:
                fresh = members[torch.randperm(len(members), generator=self.generator)]
                self.queues[c] = torch.cat([self.queues[c], fresh[: len(fresh) // self.m * self.m]])
            plan[where] = self.queues[c][:need].view(-1, self.m)
            self.queues[c] = self.queues[c][need:]
        self.plan, self.row = plan.view(n, self.batch_size), 0

    def _gather(self) -> None:
        """Gather this rank's rows of the whole plan with one index_select."""
        idx = self.plan.view(len(self.plan), self.world_size, -1)[:, self.rank].reshape(-1)
        idx = idx.to(self.split.x.device)
        self._chunk = (self.split.x.index_select(0, idx), self.split.y.index_select(0, idx))

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.plan is None or self.row == len(self.plan):
            self._plan_chunk()
            self._chunk = None
        if self._chunk is None:
            self._gather()
        share = self.batch_size // self.world_size
        x, y = (t[self.row * share: (self.row + 1) * share] for t in self._chunk)
        self.row += 1
        self.batches += 1
        if self.augment:
            x = augment_batch(x, self.aug_generator)
        return x, y

    def __iter__(self) -> GroupedBatchStream:
        return self

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "aug_generator": self.aug_generator.get_state(),
                "queues": [q.clone() for q in self.queues],
                "plan": None if self.plan is None else self.plan.clone(), "row": self.row,
                "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.aug_generator.set_state(state["aug_generator"])
        self.queues = [q.cpu() for q in state["queues"]]  # a checkpoint may map them to the GPU
        self.plan = None if state["plan"] is None else state["plan"].cpu()
        self.row, self.batches = state["row"], state["batches"]
        self._chunk = None


def check_sampler(cfg, data: Dataset, batch_size: int) -> None:
    """One clear error, before training, when ``data.sampler=grouped`` lacks examples: K labels x
    m examples need m examples of every class, in the training split and in the test split
    (whose train-mode evaluation uses the same rule). The number of classes and the task are
    checked before, with the config (bnlab.run.preflight)."""
    if cfg.sampler != "grouped":
        return
    k = int(cfg.labels_per_batch)
    m = batch_size // k
    for name, split in (("training", data.train), ("test", data.test)):
        counts = torch.bincount(split.y.cpu(), minlength=data.num_classes)
        fewest = int(counts.argmin())
        if counts[fewest] < m:
            raise UserError(f"data.sampler=grouped with train.batch_size={batch_size} and "
                            f"data.labels_per_batch={k} needs {m} examples of every class; class "
                            f"{fewest} of the {data.name} {name} split has {int(counts[fewest])}")


def make_batch_stream(split: Split, batch_size: int, seed: int, cfg, rank: int = 0,
                      world_size: int = 1, augment: bool | None = None,
                      ) -> BatchStream | GroupedBatchStream:
    """The batch stream ``cfg`` (the data config) asks for: ``sampler=iid`` or ``grouped``.

    ``augment`` defaults to ``cfg.augment``.
    """
    augment = bool(cfg.augment) if augment is None else augment
    if cfg.sampler == "grouped":
        return GroupedBatchStream(split, batch_size, int(cfg.labels_per_batch), seed,
                                  augment=augment, rank=rank, world_size=world_size)
    return BatchStream(split, batch_size, seed, augment=augment, rank=rank, world_size=world_size)
