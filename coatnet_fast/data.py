"""Data for ``coatnet-fast train``: the embedded digits set, and ImageFolder trees.

``digits`` needs no download: scikit-learn ships ``load_digits`` (1,797 8x8 handwritten
digits, 16 grey levels), which is upsampled here to the model's input size, with a fixed,
stratified, held-out validation split. ``image_folder`` reads ``PATH/train`` and ``PATH/val``
class-per-folder trees through torchvision, which stays an optional dependency.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

DIGITS_CLASSES = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_digits_arrays() -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "the embedded digits data set needs scikit-learn: pip install scikit-learn "
            "(or pip install 'coatnet-fast[train]'), or train on an ImageFolder tree with --data PATH"
        ) from e
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)  # [1797, 8, 8], values 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def digits_split_indices(labels: torch.Tensor, val_fraction: float = 0.2, seed: int = 0):
    """A stratified split: per class, a seeded permutation; the first round(n * val_fraction)
    of each class go to validation. Returns (train_indices, val_indices), each sorted."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction!r}")
    g = torch.Generator().manual_seed(int(seed))
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = max(1, int(round(idx.numel() * val_fraction)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


def digits(split: str, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """scikit-learn's digits as a TensorDataset of ([N, 1, S, S] float32, [N] int64).

    The 8x8 images are upsampled to ``image_size`` (bilinear, align_corners=False) and
    normalised with the mean and standard deviation of the training split's pixels, the same
    for both splits. The split is stratified and fixed by ``seed``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8; got {image_size!r}")
    images, labels = _load_digits_arrays()
    train_idx, val_idx = digits_split_indices(labels, val_fraction, seed)
    x = F.interpolate((images / 16.0).unsqueeze(1), size=(image_size, image_size), mode="bilinear",
                      align_corners=False)
    train_x = x[train_idx]
    mean, std = train_x.mean(), train_x.std()
    idx = train_idx if split == "train" else val_idx
    return TensorDataset(((x[idx] - mean) / std).contiguous(), labels[idx].clone())


def random_translate(x: torch.Tensor, max_shift: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shift each image of a batch [B, C, H, W] by its own random (dy, dx) in
    [-max_shift, max_shift], filling the uncovered border with that image's minimum (the
    background of a normalised digit). The random draws come from ``generator`` (on the CPU).
    The result has ``x``'s strides (its memory format), whatever C is."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    fill = x.amin(dim=(1, 2, 3), keepdim=True)
    padded = F.pad(x - fill, (max_shift,) * 4) + fill
    shifts = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    rows = shifts[0][:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = shifts[1][:, None] + torch.arange(w, device=x.device)  # [B, W]
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    # Not .contiguous(memory_format=...): with C == 1 the gathered [B, 1, H, W] view (channels_last
    # strides) already counts as contiguous and would be kept, and convolutions follow the exact
    # strides, so the whole network would run channels_last even with channels_last off.
    return torch.empty_like(x).copy_(out.permute(0, 3, 1, 2))


def image_folder(path: str, split: str, image_size: int = 224) -> Dataset:
    """``path/train`` or ``path/val`` as a torchvision ImageFolder of RGB images at
    ``image_size``: random-resized crops and flips for training, resize + centre crop for
    validation, both normalised with the ImageNet statistics."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val'; got {split!r}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"--data {path!r}: no such directory (expected {path}/train/<class>/*.jpg and "
                         f"{path}/val/<class>/*.jpg)")
    root = os.path.join(path, split)
    if not os.path.isdir(root):
        raise ValueError(f"--data {path!r} has no {split}/ folder; expected an ImageFolder layout "
                         f"{path}/train/<class>/<image> and {path}/val/<class>/<image>")
    try:
        from torchvision import datasets, transforms
    except ImportError as e:
        raise ImportError(
            "--data PATH reads an ImageFolder tree through torchvision, which is not installed: "
            "pip install torchvision (the build matching your torch), or leave out --data to train "
            "on the embedded digits"
        ) from e
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if split == "train":
        tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), normalize])
    else:
        tf = transforms.Compose([transforms.Resize(int(round(image_size * 256 / 224))),
                                 transforms.CenterCrop(image_size), transforms.ToTensor(), normalize])
    try:
        return datasets.ImageFolder(root, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise ValueError(f"--data {path!r}: {root} is not an ImageFolder tree ({e})") from e
