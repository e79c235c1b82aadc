"""NYUv2 in the MTAN ``.npy`` layout, loaded into the scenes benchmark's schema.

The preprocessed NYUv2 of Liu et al. (2019, MTAN) stores one file per image and task::

    ROOT/train/image/0.npy   (288, 384, 3)  RGB in [0, 1]
    ROOT/train/label/0.npy   (288, 384)     class 0..12, -1 = unlabelled
    ROOT/train/depth/0.npy   (288, 384, 1)  metres, 0 = no measurement
    ROOT/train/normal/0.npy  (288, 384, 3)  unit normals, 0 = invalid
    ROOT/val/...                            the 654 test images (795 for train)

:func:`load_nyuv2` returns the same dict as
:func:`mtl_utils.data.scenes.render_scenes` (``label`` becomes ``segmentation``; there
is no ``count``), so every loss, metric and model of the book applies unchanged.
Files are read with ``np.load(..., allow_pickle=False)``: a pickled object array is
refused rather than executed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl_utils.tasks import Task
from mtl_utils.validation import check_finite, check_image, check_labels

NYUV2_SIZE = (288, 384)
NYUV2_CLASSES = 13
#: folder name in the MTAN layout -> key in the returned dict
FOLDERS = {
    "image": "image",
    "label": "segmentation",
    "depth": "depth",
    "normal": "normal",
}
_CHANNELS = {"image": 3, "label": None, "depth": 1, "normal": 3}
HOW_TO_GET = (
    "download the preprocessed NYUv2 of MTAN (Liu et al. 2019; see the README of "
    "github.com/lorenmt/mtan) and unpack it so that ROOT/train/image/0.npy exists"
)


def _expected_shape(folder: str, size: tuple[int, int]) -> tuple[int, ...]:
    channels = _CHANNELS[folder]
    return size if channels is None else (*size, channels)


def _load(path: Path, folder: str, size: tuple[int, int] | None) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # pickled (refused), truncated
        why = "without pickle" if "pickle" in str(err) else "(truncated or corrupt)"
        raise ValueError(
            f"{path}: cannot be read {why} ({err}); expected a plain numeric .npy "
            "array: replace this file"
        ) from None
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: dtype {array.dtype}; expected a numeric array")
    if folder == "depth" and array.ndim == 2:
        array = array[..., None]
    shape = _expected_shape(folder, size or array.shape[:2])
    if array.shape != shape:
        raise ValueError(
            f"{path}: shape {array.shape}; expected {shape} for {folder!r}"
        )
    if folder == "image":
        check_image(array, str(path))
    elif folder == "label":
        check_labels(
            array,
            NYUV2_CLASSES,
            str(path),
            hint=" (copies that mark unlabelled pixels with 255: map them to -1)",
        )
    else:
        check_finite(array, str(path))
    return array


def load_nyuv2(
    root: str | Path,
    split: str = "train",
    max_samples: int | None = None,
    size: tuple[int, int] | None = NYUV2_SIZE,
) -> dict[str, np.ndarray]:
    """Load one split of NYUv2 (MTAN layout) as arrays keyed by task name.

    Parameters
    ----------
    root:
        Folder holding ``train/`` and ``val/``.
    split:
        ``"train"`` or ``"val"``.
    max_samples:
        Load only the first files (0.npy, 1.npy, ...), e.g. for a quick run.
    size:
        Expected ``(H, W)``; ``None`` accepts any size that is the same for all files.

    Returns
    -------
    dict
        ``image`` (N, H, W, 3) float32; ``segmentation`` (N, H, W) int32 (-1 =
        unlabelled); ``depth`` (N, H, W, 1) float32 (0 = invalid); ``normal``
        (N, H, W, 3) float32 (0 = invalid).

    Raises
    ------
    FileNotFoundError
        If the split's folders are missing (the message says how to get the data).
    ValueError
        If a file cannot be read (pickled or truncated), has the wrong shape or
        dtype, holds labels outside 0..12 (or -1), an image outside [0, 1] or
        non-finite values (naming the file).
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")
    base = Path(root) / split
    for folder in FOLDERS:
        if not (base / folder).is_dir():
            raise FileNotFoundError(
                f"NYUv2 folder {base / folder} does not exist: {HOW_TO_GET}, "
                f"with ROOT = {Path(root)}"
            )
    names = sorted(
        (p.name for p in (base / "image").glob("*.npy")),
        key=lambda n: int(Path(n).stem),
    )
    if max_samples is not None:
        names = names[: int(max_samples)]
    for folder in FOLDERS:
        missing = [n for n in names if not (base / folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{base / folder} lacks {missing[:5]} (present in {base / 'image'}); "
                "every image needs a label, depth and normal file"
            )
    out: dict[str, list[np.ndarray]] = {key: [] for key in FOLDERS.values()}
    for name in names:
        first = _load(base / "image" / name, "image", size)
        hw = tuple(first.shape[:2])
        out["image"].append(first)
        for folder in ("label", "depth", "normal"):
            out[FOLDERS[folder]].append(_load(base / folder / name, folder, hw))
    if not names:
        h, w = size or (0, 0)
        return {
            "image": np.zeros((0, h, w, 3), np.float32),
            "segmentation": np.zeros((0, h, w), np.int32),
            "depth": np.zeros((0, h, w, 1), np.float32),
            "normal": np.zeros((0, h, w, 3), np.float32),
        }
    return {
        "image": np.stack(out["image"]).astype(np.float32),
        "segmentation": np.rint(np.stack(out["segmentation"])).astype(np.int32),
        "depth": np.stack(out["depth"]).astype(np.float32),
        "normal": np.stack(out["normal"]).astype(np.float32),
    }


def save_nyuv2_layout(arrays: dict[str, np.ndarray], root: str | Path, split: str):
    """Write arrays (the schema of :func:`load_nyuv2`) in the MTAN file layout.

    Used to make small NYUv2-layout samples from the scenes benchmark for tests and
    for running the NYUv2 recipe without the real data. ``segmentation`` is written as
    ``label`` (float, as MTAN stores it).
    """
    base = Path(root) / split
    n = len(arrays["image"])
    for folder, key in FOLDERS.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            value = arrays[key][i]
            if folder == "label":
                value = value.astype(np.float32)
            np.save(base / folder / f"{i}.npy", value, allow_pickle=False)
    return base


#: Architectures a :class:`NYUv2Recipe` may name (:meth:`NYUv2Recipe.build_model`).
RECIPE_ARCHITECTURES = ("segnet_mtan", "segnet_split", "hard_sharing")


@dataclasses.dataclass(frozen=True)
class NYUv2Recipe:
    """The settings of a NYUv2 training run, in one place.

    The defaults are the NYUv2 setup of MTAN (Liu, Johns and Davison, CVPR 2019),
    as its authors' code runs it (github.com/lorenmt/mtan,
    ``im2im_pred/model_segnet_mtan.py``): SegNet-MTAN with batch normalisation at
    full width on 288x384 images, three tasks (13-class segmentation, depth,
    normals), Adam at 1e-4 halved every 100 epochs (``StepLR(step_size=100,
    gamma=0.5)``), batch size 2, 200 epochs, equal loss weights (the code's
    default; ``"dwa"`` with temperature 2 and ``"uncertainty"`` are its options).
    MTAN has no validation split: it reports the average over the last 10 epochs
    on the 654 test images (the layout's ``val`` folder). ``num_val > 0`` carves a
    validation split from the end of the training images instead, as
    ``mtl_utils.experiments.load_data`` does.

    Change a setting with ``dataclasses.replace(MTAN_NYUV2, ...)`` and list what
    then differs from the paper with :meth:`differences`. :meth:`build_model`
    and :meth:`make_optimizer` build the network and the optimizer the settings
    name.
    """

    input_size: tuple[int, int] = NYUV2_SIZE
    num_classes: int = NYUV2_CLASSES
    tasks: tuple[str, ...] = ("segmentation", "depth", "normal")
    architecture: str = "segnet_mtan"
    width: float = 1.0
    batch_norm: bool = True
    optimizer: str = "adam"
    learning_rate: float = 1e-4
    epochs: int = 200
    decay_every: int = 100
    decay_factor: float = 0.5
    batch_size: int = 2
    weighting: str = "equal"
    dwa_temperature: float = 2.0
    num_val: int = 0
    report_last_epochs: int = 10

    def __post_init__(self) -> None:
        for name in ("num_classes", "epochs", "decay_every", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected a positive integer")
        for name in ("num_val", "report_last_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r}; expected an integer >= 0")
        if not (self.learning_rate > 0 and self.width > 0):
            raise ValueError(
                f"learning_rate={self.learning_rate!r}, width={self.width!r}; "
                "expected both > 0"
            )
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"decay_factor={self.decay_factor!r}; expected (0, 1]")
        if self.architecture not in RECIPE_ARCHITECTURES:
            raise ValueError(
                f"architecture={self.architecture!r}; expected one of "
                f"{RECIPE_ARCHITECTURES}"
            )
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size={self.input_size!r}; expected (H, W)")
        if self.architecture.startswith("segnet") and not self.batch_norm:
            raise ValueError(
                f"batch_norm=False with architecture={self.architecture!r}: the "
                "SegNet builders always normalise, as the reference; expected "
                "batch_norm=True, or architecture='hard_sharing'"
            )

    def learning_rate_at(self, epoch: int) -> float:
        """The rate of epoch ``epoch`` (0-based), as ``StepLR`` sets it."""
        return self.learning_rate * self.decay_factor ** (epoch // self.decay_every)

    def learning_rate_schedule(self, steps_per_epoch: int):
        """A ``keras.optimizers.schedules.PiecewiseConstantDecay`` over optimizer
        steps that gives every step of epoch ``e`` :meth:`learning_rate_at(e)`
        (a float when the run ends before the first decay)."""
        import keras

        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch!r}; expected >= 1")
        starts = range(self.decay_every, self.epochs, self.decay_every)
        # PiecewiseConstantDecay keeps values[i] while step <= boundaries[i];
        # steps count from 0, so epoch e starts at step e * steps_per_epoch.
        boundaries = [e * steps_per_epoch - 1 for e in starts]
        values = [self.learning_rate_at(0)]
        values += [self.learning_rate_at(e) for e in starts]
        if not boundaries:  # no decay within the run: a constant rate
            return values[0]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)

    def build_model(self, tasks: Sequence[Task]):
        """The recipe's network for ``tasks`` on RGB images of ``input_size``.

        ``"segnet_mtan"`` and ``"segnet_split"``:
        :func:`mtl_utils.segnet.build_segnet_mtan` and
        :func:`~mtl_utils.segnet.build_segnet_split` at ``width`` (batch
        normalisation after every convolution, as the reference code);
        ``"hard_sharing"``: :func:`mtl_utils.models.build_multitask` with a
        VGG-16 encoder at ``width``, with batch normalisation if ``batch_norm``.

        ``tasks`` must be the recipe's ``tasks`` (by name, in any order), with
        ``num_classes`` channels for segmentation.
        """
        names = [getattr(t, "name", t) for t in tasks]
        if sorted(names) != sorted(self.tasks):
            raise ValueError(
                f"tasks {names}; expected the recipe's tasks {list(self.tasks)}"
            )
        for t in tasks:
            if t.kind == "segmentation" and t.channels != self.num_classes:
                raise ValueError(
                    f"task {t.name!r} has {t.channels} classes; expected the "
                    f"recipe's num_classes={self.num_classes}"
                )
        shape = (*self.input_size, 3)
        if self.architecture == "hard_sharing":
            from mtl_utils.models import build_multitask

            return build_multitask(
                tasks, shape, "vgg16", width=self.width, batch_norm=self.batch_norm
            )
        from mtl_utils import segnet

        build = getattr(segnet, f"build_{self.architecture}")
        return build(tasks, shape, width=self.width)

    def make_optimizer(self, steps_per_epoch: int):
        """A fresh Keras optimizer ``optimizer`` with
        :meth:`learning_rate_schedule`.

        Adam has PyTorch's defaults, which the reference code runs with
        (``beta_1=0.9``, ``beta_2=0.999``, ``epsilon=1e-8``; Keras' own default
        epsilon is ``1e-7``); another name goes to ``keras.optimizers.get``
        with Keras' defaults. One difference remains: Keras adds epsilon to
        ``sqrt(v)`` before the bias correction, PyTorch after it, so at step
        ``t`` Keras' epsilon acts like PyTorch's times ``1 / sqrt(1 - beta_2**t)``
        (31.6 at the first step, under 1.01 after 4,000 steps); it matters only
        where ``sqrt(v)`` is that small.
        """
        import keras

        schedule = self.learning_rate_schedule(steps_per_epoch)
        if self.optimizer == "adam":
            return keras.optimizers.Adam(
                schedule, beta_1=0.9, beta_2=0.999, epsilon=1e-8
            )
        return keras.optimizers.get(
            {"class_name": self.optimizer, "config": {"learning_rate": schedule}}
        )

    def differences(self, reference: NYUv2Recipe | None = None) -> dict:
        """``{setting: (this recipe's value, the reference's)}`` where they differ;
        the reference is MTAN's setup unless given."""
        reference = reference or NYUv2Recipe()
        return {
            f.name: (getattr(self, f.name), getattr(reference, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(reference, f.name)
        }


#: MTAN's NYUv2 setup (Liu, Johns and Davison 2019; lorenmt/mtan).
MTAN_NYUV2 = NYUv2Recipe()
