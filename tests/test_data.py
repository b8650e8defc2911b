"""Data loading through the real code paths, on tiny files written in the original formats; the
batch streams and samplers; the linear regression set."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bnlab.config.schema import DataConfig
from bnlab.data import (
    IDX_FILES,
    BatchStream,
    DataError,
    GroupedBatchStream,
    Split,
    augment_batch,
    load_dataset,
    read_idx,
)
from bnlab.errors import UserError

from helpers import compose, train_in_process


def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's IDX format: 0x0000, dtype 0x08 (ubyte), ndim, big-endian int32 sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def tiny_mnist(raw: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> dict:
    rng = np.random.RandomState(1)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.randint(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.randint(0, 10, n_test),
    }
    raw.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(raw / name, array)
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
            (raw / name).unlink()
    return arrays


def data_cfg(name: str, root: Path, normalize: bool = False, download: bool = False):
    """The data group's node as the schema types it (every key, its default where not given)."""
    return OmegaConf.structured(DataConfig(name=name, root=str(root), normalize=normalize,
                                           download=download))


def test_mnist_idx_files_load_as_resident_tensors(tmp_path):
    arrays = tiny_mnist(tmp_path / "MNIST" / "raw")
    data = load_dataset(data_cfg("mnist", tmp_path), torch.device("cpu"))
    assert data.train.x.shape == (12, 1, 28, 28) and data.test.x.shape == (5, 1, 28, 28)
    assert data.train.x.dtype == torch.float32
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)
    torch.testing.assert_close(data.train.x[:, 0], expected)
    assert data.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_mnist_original_gz_files_are_decompressed(tmp_path):
    arrays = tiny_mnist(tmp_path / "MNIST" / "raw", gz=True)
    data = load_dataset(data_cfg("mnist", tmp_path), torch.device("cpu"))
    assert data.train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert all((tmp_path / "MNIST" / "raw" / f).is_file() for f in IDX_FILES)


def test_normalize_standardizes_with_training_statistics(tmp_path):
    tiny_mnist(tmp_path / "MNIST" / "raw", n_train=40)
    data = load_dataset(data_cfg("mnist", tmp_path, normalize=True), torch.device("cpu"))
    assert abs(data.train.x.mean().item()) < 1e-5
    assert data.train.x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_wrong_magic_number_is_a_data_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    tiny_mnist(raw)
    content = bytearray((raw / "train-images-idx3-ubyte").read_bytes())
    content[2] = 0x0D  # float32 type code: not the original format
    (raw / "train-images-idx3-ubyte").write_bytes(bytes(content))
    with pytest.raises(DataError, match="wrong magic number"):
        load_dataset(data_cfg("mnist", tmp_path), torch.device("cpu"))


def test_truncated_idx_file_is_a_data_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    tiny_mnist(raw)
    content = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").write_bytes(content[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(raw / "t10k-images-idx3-ubyte")


def test_missing_data_without_download_names_files_and_offline_options(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(data_cfg("mnist", tmp_path / "empty"), torch.device("cpu"))
    message = str(err.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "empty") in message
    assert "data=digits" in message and "\n" not in message
    assert not (tmp_path / "empty").exists()  # nothing created for a run that cannot start


def write_cifar_batch(path: Path, n: int, rng: np.random.RandomState) -> tuple[np.ndarray, list]:
    data = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
    labels = rng.randint(0, 10, n).tolist()
    with open(path, "wb") as f:
        pickle.dump({"batch_label": path.name, "labels": labels, "data": data,
                     "filenames": [f"{i}.png" for i in range(n)]}, f)
    return data, labels


def tiny_cifar(root: Path) -> tuple[np.ndarray, list]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(2)
    first = None
    for i in range(1, 6):
        batch = write_cifar_batch(folder / f"data_batch_{i}", 3, rng)
        first = first or batch
    write_cifar_batch(folder / "test_batch", 4, rng)
    return first


def test_cifar10_python_batches_load_channels_first(tmp_path):
    data0, labels0 = tiny_cifar(tmp_path)
    data = load_dataset(data_cfg("cifar10", tmp_path), torch.device("cpu"))
    assert data.train.x.shape == (15, 3, 32, 32) and data.test.x.shape == (4, 3, 32, 32)
    # The pickle rows are R plane, G plane, B plane of 32x32 each.
    expected = torch.from_numpy(data0[0].reshape(3, 32, 32).astype(np.float32) / 255)
    torch.testing.assert_close(data.train.x[0], expected)
    assert data.train.y[:3].tolist() == labels0


def test_cifar_folder_is_torchvisions_download_folder():
    import torchvision.datasets as tvd

    from bnlab.data import CIFAR_FOLDER

    assert CIFAR_FOLDER == tvd.CIFAR10.base_folder  # a download lands where bnlab reads


def test_a_run_with_its_files_present_never_imports_torchvision(tmp_path):
    """torchvision's import costs ~2 s of every start-up; bnlab needs it only to download."""
    import subprocess
    import sys

    tiny_mnist(tmp_path / "MNIST" / "raw")
    tiny_cifar(tmp_path)
    code = ("import sys, torch; from bnlab.config.schema import DataConfig; "
            "from bnlab.data import load_dataset; from bnlab.run.process import versions; "
            "[load_dataset(DataConfig(name=n, root=sys.argv[1], download=False), "
            "torch.device('cpu')) for n in ('mnist', 'cifar10', 'digits')]; "
            "v = versions(); print('torchvision' in sys.modules, v['torchvision'])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         check=True).stdout.split()
    from importlib.metadata import version

    assert out == ["False", version("torchvision")]


def test_corrupt_cifar_batch_is_a_data_error(tmp_path):
    tiny_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset(data_cfg("cifar10", tmp_path), torch.device("cpu"))


def test_digits_is_sklearns_set_with_a_fixed_split():
    from sklearn.datasets import load_digits

    data = load_dataset(data_cfg("digits", "/nonexistent"), torch.device("cpu"))
    assert len(data.train) + len(data.test) == 1797 and data.num_classes == 10
    reference = load_digits()
    order = np.random.RandomState(0).permutation(1797)
    torch.testing.assert_close(data.train.x[:5].view(5, 64) * 16,
                               torch.from_numpy(reference.data[order[:5]]).float())


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_found_in_debian_package(tmp_path):
    data = load_dataset(data_cfg("fashion_mnist", tmp_path), torch.device("cpu"))
    assert len(data.train) == 60000 and len(data.test) == 10000 and data.num_classes == 10
    assert not list((tmp_path / "FashionMNIST" / "raw").glob("*.partial"))


def test_batch_stream_epoch_is_a_permutation_and_resumes_exactly():
    split = Split(torch.arange(20.0).view(20, 1, 1, 1), torch.arange(20))
    stream = BatchStream(split, batch_size=6, seed=3)
    first_epoch = torch.cat([next(stream)[1] for _ in range(3)])
    assert sorted(first_epoch.tolist()) == sorted(set(first_epoch.tolist()))  # no repeats
    state = stream.state_dict()
    expected = [next(stream)[1].tolist() for _ in range(5)]
    resumed = BatchStream(split, batch_size=6, seed=99)
    resumed.load_state_dict(state)
    assert [next(resumed)[1].tolist() for _ in range(5)] == expected


def test_batch_stream_shards_are_the_global_batch():
    split = Split(torch.arange(30.0).view(30, 1, 1, 1), torch.arange(30))
    whole = [next(BatchStream(split, 10, seed=5))[1]]
    shards = [next(BatchStream(split, 10, seed=5, rank=r, world_size=2))[1] for r in range(2)]
    assert torch.cat(shards).tolist() == whole[0].tolist()


def test_augment_flips_and_shifts_within_padding():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8) + 1
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    for img, src in zip(out, x, strict=True):
        candidates = [src, src.flip(2)]
        # every non-padding pixel of the crop comes from the (possibly flipped) source
        assert any(set(img[img > 0].tolist()) <= set(c.flatten().tolist()) for c in candidates)


def test_chunked_gathers_hand_out_the_same_batches_as_one_gather_per_batch():
    split = Split(torch.randn(50, 1, 2, 2), torch.arange(50))
    chunked = BatchStream(split, batch_size=7, seed=4, chunk_rows=30)
    single = BatchStream(split, batch_size=7, seed=4, chunk_rows=1)
    for _ in range(20):  # almost three epochs, across chunk and epoch boundaries
        (xa, ya), (xb, yb) = next(chunked), next(single)
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


# ---------------------------------------------------------------- binary inputs (data.binarize)
def test_binarize_thresholds_at_half_the_maximum_before_standardizing(tmp_path):
    arrays = tiny_mnist(tmp_path / "MNIST" / "raw", n_train=40)
    pixels = arrays["train-images-idx3-ubyte"]
    binary = torch.from_numpy((pixels > 127.5).astype(np.float32))
    raw_cfg = data_cfg("mnist", tmp_path)
    raw_cfg.binarize = True
    data = load_dataset(raw_cfg, torch.device("cpu"))
    assert torch.equal(data.train.x[:, 0], binary)  # 128 -> 1, 127 -> 0
    assert set(data.test.x.unique().tolist()) == {0.0, 1.0}
    std_cfg = data_cfg("mnist", tmp_path, normalize=True)
    std_cfg.binarize = True
    standardized = load_dataset(std_cfg, torch.device("cpu")).train.x[:, 0]
    expected = (binary - binary.mean()) / binary.std()
    torch.testing.assert_close(standardized, expected)


def test_binarize_is_refused_for_a_regression_task():
    with pytest.raises(UserError, match="data.binarize=true is not valid with data=linear"):
        load_dataset(compose("data=linear", "data.binarize=true").data, torch.device("cpu"))


# ---------------------------------------------------------------- grouped batches (Ioffe 2017, 4.3)
def labelled_split(counts: list[int]) -> Split:
    """Rows numbered 0..N-1 (x holds the row number), labels in blocks of the given sizes, shuffled."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    return Split(torch.arange(float(len(y))).view(-1, 1, 1, 1), y)


def test_grouped_batches_hold_k_distinct_labels_times_m_examples():
    split = labelled_split([30, 25, 41, 12, 19])  # unequal classes
    stream = GroupedBatchStream(split, batch_size=12, labels_per_batch=3, seed=1, chunk_rows=40)
    seen = {c: [] for c in range(5)}
    for _ in range(60):  # many chunks, several passes over the smallest class
        x, y = next(stream)
        rows = x.flatten().long()
        assert torch.equal(split.y[rows], y)  # x and y are the same examples
        assert len(set(rows.tolist())) == 12  # no example twice in a batch
        groups = y.view(3, 4)  # K groups of m consecutive rows, one label each, K labels
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 3
        for label, group in zip(groups[:, 0].tolist(), rows.view(3, 4), strict=True):
            seen[label].extend(group.tolist())
    for c, n in enumerate([30, 25, 41, 12, 19]):
        usable = n // 4 * 4  # each permutation drops its last n mod m examples
        for start in range(0, len(seen[c]) - usable + 1, usable):
            assert len(set(seen[c][start:start + usable])) == usable  # once each per pass
    # Labels are drawn uniformly: every class leads some batches.
    assert all(len(v) > 0 for v in seen.values())


def test_grouped_stream_is_seeded_and_resumes_exactly_mid_chunk():
    split = labelled_split([20, 20, 20, 20])
    first = GroupedBatchStream(split, batch_size=8, labels_per_batch=2, seed=3, chunk_rows=24)
    same = GroupedBatchStream(split, batch_size=8, labels_per_batch=2, seed=3, chunk_rows=24)
    other = GroupedBatchStream(split, batch_size=8, labels_per_batch=2, seed=4, chunk_rows=24)
    batches = [next(first)[1] for _ in range(5)]  # 3 batches a chunk: stop inside the second
    assert all(torch.equal(a, next(same)[1]) for a in batches)
    assert not all(torch.equal(a, next(other)[1]) for a in batches)
    state = first.state_dict()
    expected = [next(first) for _ in range(20)]
    resumed = GroupedBatchStream(split, batch_size=8, labels_per_batch=2, seed=99, chunk_rows=24)
    resumed.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, (next(resumed) for _ in range(20)), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_grouped_shards_are_the_global_batch():
    split = labelled_split([15, 15, 15])
    whole = next(GroupedBatchStream(split, 12, 3, seed=5))[0]
    shards = [next(GroupedBatchStream(split, 12, 3, seed=5, rank=r, world_size=2))[0] for r in range(2)]
    assert torch.equal(torch.cat(shards), whole)


@pytest.mark.parametrize("overrides, message", [
    (["data.labels_per_batch=12", "train.batch_size=24"],
     "data.labels_per_batch=12 is not valid: data=digits has 10 classes"),
    (["data=linear", "data.labels_per_batch=2"],
     "data.sampler=grouped is not valid with data=linear: a regression has no labels"),
    (["data.labels_per_batch=2", "train.batch_size=100"], None),  # the test split is too small
])
def test_grouped_sampler_that_cannot_build_its_batches_fails_before_training(tmp_path, overrides,
                                                                              message):
    if message is None:  # 2 labels x 50: the training split has 50 of every class, the test split not
        digits = load_dataset(compose("data=digits").data, torch.device("cpu"))
        counts = torch.bincount(digits.test.y)
        assert torch.bincount(digits.train.y).min() >= 50 > counts.min()
        message = (f"needs 50 examples of every class; class {int(counts.argmin())} of the digits "
                   f"test split has {int(counts.min())}")
    with pytest.raises(UserError) as err:
        train_in_process(tmp_path / "run", "data=digits", "data.sampler=grouped", *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "scalars.csv").exists()


def test_done_when_grouped_digits_run_trains(tmp_path):
    run = tmp_path / "run"
    assert train_in_process(run, "data=digits", "data.sampler=grouped", "data.labels_per_batch=2",
                            "train.batch_size=20", "train.steps=100") == "completed"
    rows = [line.split(",") for line in (run / "scalars.csv").read_text().splitlines()[1:]]
    tags = {t for _, t, _ in rows}
    assert {"train/loss", "test/acc", "test/acc_train_mode"} <= tags


# ---------------------------------------------------------------- the linear data set
def test_the_linear_data_set_is_a_regression_the_trainer_fits_with_mse(tmp_path: Path) -> None:
    """santurkar_dln's task: y = A x exactly, one A for both splits; MSE loss, no accuracy."""
    import torch.nn.functional as F

    from bnlab.models import build_model
    from bnlab.run.trainer import evaluate

    cfg = compose("experiment=santurkar_dln", "model.widths=[10,10,10]")
    data = load_dataset(cfg.data, torch.device("cpu"))
    assert (data.task, data.num_outputs, data.num_classes) == ("regression", 10, 0)
    x, y = data.train.x.flatten(1), data.train.y
    a = torch.linalg.lstsq(x, y).solution
    torch.testing.assert_close(x @ a, y, atol=1e-4, rtol=0)
    torch.testing.assert_close(data.test.x.flatten(1) @ a, data.test.y, atol=1e-4, rtol=0)

    model = build_model(cfg, data.shape, data.num_outputs).eval()
    loss, acc = evaluate(model, data.test, 300, task="regression")  # batches of unequal size
    with torch.no_grad():
        assert loss == pytest.approx(F.mse_loss(model(data.test.x), data.test.y).item(), rel=1e-5)
    assert acc != acc  # NaN: a regression has no accuracy

    run = tmp_path / "run"
    assert train_in_process(run, "experiment=santurkar_dln", "model.widths=[10,10,10]",
                            "train.steps=40", "train.eval_every=20", "probe=off") == "completed"
    with open(run / "scalars.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()[1:]]
    tags = {tag for _, tag, _ in rows}
    assert {"train/loss", "test/loss"} <= tags and not {"train/acc", "test/acc"} & tags
    test_loss = [float(v) for _, tag, v in rows if tag == "test/loss"]
    assert test_loss[-1] < test_loss[0]


# ---------------------------------------------------------------- preparing a data set at once, and damage
BARRIER = """
import gzip, os, sys, time
from pathlib import Path
barrier, n = Path(sys.argv[1]), int(sys.argv[2])
opened = gzip.open
def together(*args, **kwargs):  # every process decompresses at the same moment
    gzip.open = opened
    (barrier / str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < n and time.time() < deadline:
        time.sleep(0.01)
    return opened(*args, **kwargs)
gzip.open = together
from bnlab.cli import main
sys.exit(main(sys.argv[3:]))
"""
ON_MNIST = ["data=mnist", "data.download=false", "train.steps=2", "train.batch_size=4",
            "train.eval_every=1", "probe=off", "train.threads=1", "train.progress=off"]


def originals(raw: Path, n_train: int) -> dict[str, bytes]:
    """MNIST's four files as IDX bytes, and their .gz originals in ``raw`` (nothing decompressed)."""
    rng = np.random.RandomState(2)
    shapes = {"train-images-idx3-ubyte": (n_train, 28, 28), "train-labels-idx1-ubyte": (n_train,),
              "t10k-images-idx3-ubyte": (5, 28, 28), "t10k-labels-idx1-ubyte": (5,)}
    raw.mkdir(parents=True)
    files = {}
    for name, shape in shapes.items():
        array = rng.randint(0, 10 if len(shape) == 1 else 256, shape)
        files[name] = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in shape) \
            + array.astype(np.uint8).tobytes()
        (raw / f"{name}.gz").write_bytes(gzip.compress(files[name], compresslevel=1))
    return files


def test_processes_that_prepare_a_data_set_at_once_all_get_it(tmp_path):
    """Three `bnlab train` processes decompress the same originals into an empty raw/ folder at
    the same moment (as a sweep's parallel jobs on a fresh data root): each gets whole files."""
    import os
    import subprocess
    import sys

    raw = tmp_path / "data" / "MNIST" / "raw"
    files = originals(raw, n_train=6000)
    (tmp_path / "barrier").mkdir()
    env = {**os.environ, "BNLAB_DATA": str(tmp_path / "data")}
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER, str(tmp_path / "barrier"), "3", "train",
                               *ON_MNIST, f"hydra.run.dir=run{i}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert {name: (raw / name).read_bytes() for name in files} == files
    assert sorted(p.name for p in raw.iterdir()) == sorted([*files, *(f"{f}.gz" for f in files)])


def test_a_damaged_decompressed_file_is_made_again_from_its_original(tmp_path):
    from helpers import bnlab

    raw = tmp_path / "data" / "MNIST" / "raw"
    files = originals(raw, n_train=12)
    load_dataset(data_cfg("mnist", tmp_path / "data"), torch.device("cpu"))  # decompresses them
    (raw / "train-images-idx3-ubyte").write_bytes(files["train-images-idx3-ubyte"][:3000])  # cut short
    result = bnlab("train", *ON_MNIST, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (raw / "train-images-idx3-ubyte").read_bytes() == files["train-images-idx3-ubyte"]
    (raw / "train-images-idx3-ubyte").write_bytes(b"garbage")
    (raw / "train-images-idx3-ubyte.gz").unlink()  # no original to make it again from: one line
    again = bnlab("train", *ON_MNIST, "hydra.run.dir=again", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr == (f"bnlab: error: {raw}/train-images-idx3-ubyte: not an unsigned-byte IDX "
                            "file (wrong magic number)\n")
