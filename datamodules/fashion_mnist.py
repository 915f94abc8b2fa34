"""`FashionMNISTDataModule`: the Fashion-MNIST photos (Xiao et al. 2017) from the Debian package, read with numpy.

design.md section 5: `apt-get install dataset-fashion-mnist` puts the four idx.gz files under
`/usr/share/datasets/fashion-mnist/`. Train = the 60,000 training images; held-out data = the 10,000 t10k images:
val is their first `val_size` (the file order is already random), test the first `test_size` (all by default).
The grey 28x28 images become RGB at `resolution` through the same `ImageTransform` as every other backend. Batches
also carry `caption`, the class name (`FASHION_MNIST_CLASSES`), for class-conditional training (design.md section 2).
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ddt_lightning.data.images import ImageTransform
from ddt_lightning.datamodules.base import check_loader_args, map_style_loader

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE = 0x08  # the idx type code for unsigned bytes


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzipped) idx file (LeCun's MNIST format) of unsigned bytes into an array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values (truncated?)")
    return array.reshape(shape)


def load_fashion_mnist(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of split "train" or "t10k"."""
    paths = [Path(root) / name for name in FILES[split]]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found; install it with `apt-get install dataset-fashion-mnist` "
                f"or point `root` at a folder holding {', '.join(FILES[split])}"
            )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.shape != (len(images),):
        raise ValueError(f"{paths[0]} / {paths[1]}: shapes {images.shape} and {labels.shape} do not match")
    return images, labels.astype(np.int64)


class GreyImages(Dataset):
    """Grey uint8 images with labels, turned into RGB tensors by an `ImageTransform`; captioned by class name."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, transform: ImageTransform, classes: Sequence[str]
    ) -> None:
        self.images = images  # (N, h, w) uint8
        self.labels = labels  # (N,) int64
        self.transform = transform
        self.classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = Image.fromarray(self.images[index])  # 2-D uint8 -> mode "L"
        label = int(self.labels[index])
        return {"image": self.transform(image), "label": label, "caption": self.classes[label]}  # image: (3, R, R)


class FashionMNISTDataModule(LightningDataModule):
    """Fashion-MNIST, 10 classes; train = 60k, val = first `val_size` of t10k, test = first `test_size` of t10k."""

    def __init__(
        self,
        root: str = "/usr/share/datasets/fashion-mnist",
        resolution: int = 32,
        val_size: int = 1000,
        test_size: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        random_flip: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_loader_args(batch_size, num_workers)
        if not 1 <= val_size <= 10_000:
            raise ValueError(f"val_size must be in 1..10000 (the t10k split), got {val_size}")
        if test_size is not None and not 1 <= test_size <= 10_000:
            raise ValueError(f"test_size must be in 1..10000 or None, got {test_size}")
        self.root = root
        self.resolution = resolution
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.classes: list[str] = list(FASHION_MNIST_CLASSES)
        self.num_classes = len(self.classes)
        self.train_transform = ImageTransform(resolution, random_flip=random_flip)
        self.eval_transform = ImageTransform(resolution)
        self.datasets: dict[str, GreyImages] = {}

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and "train" not in self.datasets:
            self.datasets["train"] = GreyImages(
                *load_fashion_mnist(self.root, "train"), self.train_transform, self.classes
            )
        if "val" not in self.datasets:
            images, labels = load_fashion_mnist(self.root, "t10k")
            test_size = self.hparams.test_size or len(labels)
            for split, size in (("val", self.hparams.val_size), ("test", test_size)):
                self.datasets[split] = GreyImages(images[:size], labels[:size], self.eval_transform, self.classes)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup("fit" if train else None)
        return map_style_loader(self, self.datasets[split], train)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def eval_dataloader(self, split: Literal["train", "val", "test"]) -> DataLoader:
        """`split` in a fixed order, without flips or a dropped tail (e.g. to tokenize a whole split once)."""
        if split != "train":
            return self._loader(split, train=False)
        images, labels = load_fashion_mnist(self.root, "train")
        return map_style_loader(self, GreyImages(images, labels, self.eval_transform, self.classes), train=False)
