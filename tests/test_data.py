import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from convsim_shrink.data import INFO, TensorLoader, balanced_subset, build_data, load_arrays, read_idx
from convsim_shrink.errors import DataNotFoundError, UnknownNameError
from convsim_shrink.recipe import DataConfig

from helpers import image_folder, truncate


def test_real_fashion_mnist_is_found_and_correct(fashion_dir):
    x, y = load_arrays("fashion-mnist", split="test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert sorted(torch.bincount(y).tolist()) == [1000] * 10


def test_bundle_with_subset_and_validation_split(fashion_dir):
    b = build_data(DataConfig(subset=500, val_split=200), batch_size=64)
    assert b.train.num_samples == 500 and b.val.num_samples == 200 and b.test.num_samples == 10000
    assert torch.bincount(b.train.labels).tolist() == [50] * 10
    # validation images are never training images
    tr = {bytes(v.numpy()) for v in b.train.images.flatten(1)}
    assert not any(bytes(v.numpy()) in tr for v in b.val.images.flatten(1))
    x, y = next(iter(b.train))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert -1.5 < float(x.mean()) < 1.5


def test_balanced_subset_is_deterministic_and_balanced():
    labels = torch.arange(1000) % 10
    a, b = balanced_subset(labels, 103, seed=3), balanced_subset(labels, 103, seed=3)
    assert torch.equal(a, b)
    counts = torch.bincount(labels[a])
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    assert not torch.equal(a, balanced_subset(labels, 103, seed=4))


def test_loader_order_depends_on_seed_and_epoch_only():
    images = torch.randint(0, 255, (50, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(50) % 10
    info = INFO["fashion-mnist"]
    mk = lambda: TensorLoader(images, labels, info, batch_size=16, train=True, seed=1)  # noqa: E731
    a, b = mk(), mk()
    a.set_epoch(3), b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(a) == 3  # drop_last when training
    b.set_epoch(4)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])


def test_augmentation_is_a_shift_or_flip_of_the_image():
    img = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8) + 1
    info = INFO["fashion-mnist"]
    loader = TensorLoader(img.repeat(32, 1, 1, 1), torch.zeros(32, dtype=torch.long), info, batch_size=32, train=True)
    x, _ = next(iter(loader))
    raw = (x * info.std[0] + info.mean[0]) * 255
    raw = raw.round()
    pad = torch.nn.functional.pad(img.float(), (2, 2, 2, 2))[0, 0]
    for sample in raw[:, 0]:
        candidates = [pad[dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(sample, c) for c in candidates)


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_from_a_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    x, y = load_arrays("fashion-mnist", tmp_path, "train")
    assert x.shape == (30, 1, 28, 28) and y.tolist()[:3] == [0, 1, 2]


def test_truncated_idx_is_a_clear_error(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(struct.pack(">HBBIII", 0, 8, 3, 10, 28, 28) + b"\x00" * 100)
    with pytest.raises(DataNotFoundError, match="not a readable IDX"):
        read_idx(p)


def _cifar_python(root, n_per_batch=8, classes=10):
    folder = root / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        key = b"labels"
    else:
        names, key = ["train", "test"], b"fine_labels"
    for name in names:
        d = {b"data": rng.integers(0, 255, (n_per_batch, 3072)).astype(np.uint8), key: list(rng.integers(0, classes, n_per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    return folder


def test_cifar10_python_format(tmp_path):
    _cifar_python(tmp_path)
    x, y = load_arrays("cifar10", tmp_path, "train")
    assert x.shape == (40, 3, 32, 32) and y.max() < 10
    xt, _ = load_arrays("cifar10", tmp_path, "test")
    assert xt.shape == (8, 3, 32, 32)


def test_cifar100_python_format_uses_fine_labels(tmp_path):
    _cifar_python(tmp_path, classes=100)
    x, y = load_arrays("cifar100", tmp_path, "train")
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64


def test_cifar10_binary_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(2)
    expected = None
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, 4).astype(np.uint8)
        pixels = rng.integers(0, 255, (4, 3072)).astype(np.uint8)
        (folder / name).write_bytes(np.concatenate([labels[:, None], pixels], 1).tobytes())
        if name == "test_batch.bin":
            expected = (labels, pixels)
    x, y = load_arrays("cifar10", tmp_path, "test")
    assert y.tolist() == expected[0].tolist()
    assert torch.equal(x[1], torch.from_numpy(expected[1][1].reshape(3, 32, 32)))


def test_cifar_pickle_with_code_is_refused(tmp_path):
    folder = _cifar_python(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataNotFoundError, match="refusing to load builtins.print"):
        load_arrays("cifar10", tmp_path, "test")


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    import convsim_shrink.data.locate as locate

    monkeypatch.setattr(locate, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(locate, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(DataNotFoundError) as err:
        load_arrays("fashion-mnist", tmp_path / "mine")
    msg = str(err.value)
    assert "nowhere" in msg and "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_arrays("cifar10", tmp_path)


def test_unknown_data_set():
    with pytest.raises(UnknownNameError, match="cifar10"):
        build_data(DataConfig(name="cifar11"), batch_size=8)


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.png")
    b = build_data(DataConfig(name="imagefolder", dir=str(tmp_path), workers=0), batch_size=2)
    assert b.info.num_classes == 2 and b.info.classes == ("cat", "dog")
    x, y = next(iter(b.test))
    assert x.shape == (2, 3, 224, 224)


def test_a_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    import urllib.error

    import torchvision

    import convsim_shrink.data.locate as locate

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(locate, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setattr(locate, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataNotFoundError, match=r"downloading fashion-mnist into .*cache failed \(.*name resolution.*\); check the network"):
        load_arrays("fashion-mnist", None, download=True)


# ------------------------------------------------------------------------- image folders (issue 12)


def test_image_folder_scan_skips_stray_empty_and_unreadable(tmp_path):
    from convsim_shrink.data import scan_image_folder

    root = image_folder(tmp_path, {"train": {"a": 3, "b": 3, "c": 2}, "val": {"a": 2, "b": 2, "c": 1}})
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x-checkpoint.png").write_bytes(b"not an image")
    (root / "train" / "empty").mkdir()
    (root / "train" / "a" / "notes.txt").write_text("hello")
    truncate(root / "train" / "b" / "0.jpg")
    scan = scan_image_folder(root)
    assert scan.classes == ("a", "b", "c")
    assert scan.stray_folders == ["train/.ipynb_checkpoints"] and scan.empty_classes == ["train/empty"]
    assert [p for p, _ in scan.unreadable] == ["train/b/0.jpg"] and scan.other_files == 1
    assert len(scan.train) == 3 + 2 + 2 and len(scan.val) == 5
    notes = scan.notes()
    assert len(notes) == 4 and all("\n" not in n for n in notes) and any("train/b/0.jpg" in n for n in notes)


def test_image_folder_trains_past_a_truncated_jpeg(tmp_path):
    root = image_folder(tmp_path, {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    truncate(root / "train" / "a" / "2.jpg")
    b = build_data(DataConfig(name="imagefolder", dir=str(root), workers=0), batch_size=3)
    assert b.train.num_samples == 7 and any("unreadable" in n for n in b.notes)
    seen = sum(len(y) for _, y in b.train)  # the truncated file never reaches a batch: no OSError mid-training
    assert seen == 6  # 7 images, batches of 3, last partial batch dropped


def test_val_labels_come_from_train_classes(tmp_path):
    from convsim_shrink.data import scan_image_folder

    root = image_folder(tmp_path, {"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 1, "c": 2}})
    scan = scan_image_folder(root)
    labels = {Path(p).parent.name: y for p, y in scan.val}
    assert labels == {"a": 0, "c": 2}  # 'c' keeps train's index although val/ has no 'b'
    assert scan.absent_from_val == ["b"]
    assert any("have no images in val/" in n and ": b" in n for n in scan.notes())
    b = build_data(DataConfig(name="imagefolder", dir=str(root), workers=0), batch_size=4)
    ys = torch.cat([y for _, y in b.test])
    assert sorted(ys.tolist()) == [0, 2, 2]


@pytest.mark.parametrize("layout,message", [
    ({"train": {"a": 2, "b": 2}, "val": {"a": 1, "d": 1}}, "class(es) that train/ has no images of (d)"),
    ({"train": {"a": 2, "b": 0}, "val": {"a": 1}}, "at least two"),
    ({"train": {"a": 2, "b": 2}, "val": {"x": 0}}, "no readable images"),
])
def test_image_folder_problems_are_one_line_errors_before_training(tmp_path, layout, message):
    from convsim_shrink.errors import ConfigError

    root = image_folder(tmp_path, layout)
    with pytest.raises(ConfigError) as err:
        build_data(DataConfig(name="imagefolder", dir=str(root), workers=0), batch_size=4)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_image_folder_without_val_is_a_data_error(tmp_path):
    root = image_folder(tmp_path, {"train": {"a": 2, "b": 2}})
    with pytest.raises(DataNotFoundError, match="no val/"):
        build_data(DataConfig(name="imagefolder", dir=str(root), workers=0), batch_size=4)


def test_training_set_smaller_than_a_batch_still_trains(tmp_path):
    """24 images with batch 128 trained zero steps (issue 12 item 9): the one partial batch is kept."""
    root = image_folder(tmp_path, {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}})
    b = build_data(DataConfig(name="imagefolder", dir=str(root), workers=0), batch_size=128)
    assert len(b.train) == 1
    assert [len(y) for _, y in b.train] == [5]
    info = INFO["fashion-mnist"]
    small = TensorLoader(torch.zeros(24, 1, 8, 8, dtype=torch.uint8), torch.arange(24) % 10, info, batch_size=128, train=True)
    assert len(small) == 1 and [len(y) for _, y in small] == [24]
    exact = TensorLoader(torch.zeros(256, 1, 8, 8, dtype=torch.uint8), torch.arange(256) % 10, info, batch_size=128, train=True)
    assert len(exact) == 2


def test_one_training_image_is_refused(tmp_path):
    from convsim_shrink.errors import ConfigError

    root = image_folder(tmp_path, {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    truncate(root / "train" / "b" / "0.jpg")
    with pytest.raises(ConfigError, match="at least two"):
        build_data(DataConfig(name="imagefolder", dir=str(root), workers=0), batch_size=4)


@pytest.mark.parametrize("workers", [0, 2])
def test_image_folder_order_and_augmentation_restored_on_resume(tmp_path, workers):
    """A resumed run (a new loader, set to the epoch) sees the same batches, augmentation included."""
    root = image_folder(tmp_path, {"train": {"a": 5, "b": 5}, "val": {"a": 1, "b": 1}}, size=(40, 48))
    cfg = DataConfig(name="imagefolder", dir=str(root), workers=workers)
    first = build_data(cfg, batch_size=4, seed=7).train
    resumed = build_data(cfg, batch_size=4, seed=7).train
    torch.manual_seed(123)  # the global random state must not matter
    first.set_epoch(3)
    a = list(first)
    torch.manual_seed(456)
    resumed.set_epoch(3)
    b = list(resumed)
    assert len(a) == len(b) == 2
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    resumed.set_epoch(4)
    c = list(resumed)
    assert not all(torch.equal(ya, yc) and torch.equal(xa, xc) for (xa, ya), (xc, yc) in zip(a, c))


def test_a_rebatched_loader_groups_the_same_images_differently():
    images = torch.randint(0, 255, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64) % 10
    loader = TensorLoader(images, labels, INFO["fashion-mnist"], batch_size=32, train=True, seed=2, augment=False)
    small = loader.rebatched(16)
    assert loader.rebatched(32) is loader and loader.batch_size == 32  # the original is left alone
    assert len(small) == 4 and len(loader) == 2
    big = torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])
    parts = [(x, y) for x, y in small]
    assert all(len(y) == 16 for _, y in parts)
    assert torch.equal(torch.cat([x for x, _ in parts]), big[0]) and torch.equal(torch.cat([y for _, y in parts]), big[1])
    # sharded: the global batch splits over the processes
    assert loader.sharded(1, 2).rebatched(16).batch_size == 8
    with pytest.raises(ValueError, match="does not divide by 2"):
        loader.sharded(0, 2).rebatched(15)
