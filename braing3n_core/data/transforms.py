"""MONAI preprocessing and augmentation: a NIfTI file in, the preset's model input out.

Pipeline (one channel throughout, `C, D, H, W` with C = 1):

1. `LoadImage` with nibabel, channel first, float32 (big-endian and scaled integers are handled by
   nibabel); trailing singleton dimensions (`X, Y, Z, 1`) are squeezed.
2. `Orientation("LPS")`: the BrainG3N input contract. Axis codes follow nibabel/DICOM: voxel index
   D grows toward the patient's Left, H toward Posterior, W toward Superior (the array an ITK image
   with identity direction would hold). Sites store RAS, LAS, LSA…; this is the one place it is undone.
3. `Spacing(preset.spacing_mm)`, trilinear, zero outside the original field of view.
4. `SuppressBackground`: intensities below 1 % of the scan's 99.5th percentile → 0. This includes the
   author's first offline step (negatives → 0) and also clears the near-zero residue that resampling
   and registration leave around the head (nilearn's own template holds values down to 1e-45 there),
   which the non-zero z-score of step 6 would otherwise count as brain. It runs after resampling so
   that "brain" is decided on the model's grid, interpolation tails included.
5. `CropForeground` to the head's bounding box, then `ResizeWithPadOrCrop` to `preset.shape`
   (symmetric, zero padding).
6. `NormalizeIntensity(nonzero=True)`: z-score over non-zero (brain) voxels; background stays 0.

`preprocess_invertible` keeps MONAI's record of steps 2-5, so that a volume on the model's grid (a
reconstruction) can be put back on the scan's own voxel grid (`PreprocessedScan.to_original`).

Training augmentation (applied after the cache, so it is fresh every epoch): `RandFlip` per spatial
axis and an intensity shift restricted to brain voxels.

The input contract is the author's: brain-extracted scans, background exactly 0. Skull stripping, N4
and atlas registration are offline steps this project does not run; a scan with a noisy background is
still preprocessed, and its z-score then includes that background.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import monai
import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader
from monai.transforms import (
    Compose,
    CropForeground,
    LoadImage,
    NormalizeIntensity,
    Orientation,
    RandFlip,
    Randomizable,
    RandShiftIntensity,
    ResizeWithPadOrCrop,
    Spacing,
    Transform,
)
from scipy import ndimage

from braing3n_core.data.cache import ArrayCache
from braing3n_core.data.inspection import check_image
from braing3n_core.errors import BadInput
from braing3n_core.fileio import file_sha256
from braing3n_core.presets import Preset

PREPROCESSING_VERSION = 1
"""Bump whenever the pipeline's output changes for the same settings; it invalidates every cache."""

ORIENTATION = "LPS"
INTERPOLATION = "bilinear"  # trilinear for 3-D volumes in MONAI/torch naming
OTSU_BINS = 256
MIN_BRAIN_FRACTION = 0.005  # of the preset grid; even nibabel's 66×82×50 mm crop fills 5 %
HEAD_MARGIN_MM = 10.0  # kept around the Otsu mask's box: covers surface CSF darker than the threshold
BACKGROUND_FRACTION = 0.01  # of the 99.5th percentile: far below CSF in T1 and nulled CSF in FLAIR
BACKGROUND_PERCENTILE = 99.5
FLIP_PROBABILITY = 0.5
INTENSITY_SHIFT = 0.1  # ± in z-score units, i.e. a tenth of the brain's standard deviation


class PreprocessingError(BadInput, RuntimeError):
    """A scan could not be turned into a model input; the message names the file and the reason."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # picklable across DataLoader workers
        return type(self), (self.path, self.reason)


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Intensity that best separates two classes (Otsu 1979): here, background from head.

    Otsu adapts to each scan's intensity scale and noise level, where a fixed fraction of the maximum
    would not (sites store raw scanner units, uint8 or floats).
    """
    counts, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = mass_low / weight_low
        mean_high = (mass_low[-1] - mass_low) / weight_high
        between_class_variance = weight_low * weight_high * (mean_low - mean_high) ** 2
    between_class_variance = np.nan_to_num(between_class_variance[:-1], nan=-1.0)
    return float(edges[1 + int(np.argmax(between_class_variance))])


class SuppressBackground(Transform):
    """Set voxels below `fraction` × the `percentile`-th intensity percentile to 0 (negatives included).

    The scale is per scan, so it works on raw scanner units, uint8 and z-scored floats alike.
    """

    def __init__(self, fraction: float = BACKGROUND_FRACTION, percentile: float = BACKGROUND_PERCENTILE) -> None:
        self.fraction = fraction
        self.percentile = percentile

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # C, D, H, W
        values = image.detach().cpu().numpy()
        threshold = max(0.0, self.fraction * float(np.percentile(values, self.percentile)))
        return torch.where(image >= threshold, image, torch.zeros_like(image)) if threshold > 0 else image.clamp(min=0)


def head_foreground(image: torch.Tensor) -> torch.Tensor:
    """`CropForeground` selector: the largest connected component above the Otsu threshold.

    Otsu over all voxels separates background (zero or noise) from brain tissue; the outermost dark
    layer (surface CSF in T1/FLAIR) may fall below it, which the crop margin (`HEAD_MARGIN_MM`) covers.
    The connected component ignores isolated noise voxels far from the head, which would otherwise
    stretch the box to the whole field of view.
    """
    volume = image.detach().cpu().numpy()  # C, D, H, W
    if np.ptp(volume) == 0:
        return torch.from_numpy(volume > 0)
    # Every 2nd voxel per axis gives the same histogram shape at an eighth of the cost.
    above = volume[0] > otsu_threshold(volume[0, ::2, ::2, ::2])
    labelled, count = ndimage.label(above)
    if count > 1:
        sizes = np.bincount(labelled.ravel())
        sizes[0] = 0
        above = labelled == int(np.argmax(sizes))
    return torch.from_numpy(above[None])


def preprocessing_transform(preset: Preset) -> Compose:
    """Path of a NIfTI file → `MetaTensor` of shape `1, D, H, W` = `1, *preset.shape`, LPS, z-scored."""
    spacing = (preset.spacing_mm,) * 3
    return Compose(
        [
            LoadImage(
                reader=NibabelReader(squeeze_non_spatial_dims=True),
                image_only=True,
                ensure_channel_first=True,
                dtype=np.float32,
            ),
            # Labels spelt out: nibabel's reader gives RAS-space affines, so the codes mean "axis grows
            # toward" (L = toward the patient's left), whatever MONAI's default becomes.
            Orientation(axcodes=ORIENTATION, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacing(pixdim=spacing, mode=INTERPOLATION, padding_mode="zeros", dtype=np.float32),
            SuppressBackground(),
            # Crop to the head's bounding box before the centre pad/crop: sites' fields of view differ
            # and are often off-centre (the neck included, the vertex cut short), so a plain centre crop
            # of the raw field of view would cut the cerebellum or the vertex of such scans. Centring the
            # box puts every brain in the middle of the model's grid.
            # allow_smaller=False: a box reaching past the field of view is zero-padded, so the brain
            # stays centred even when the scan cuts close to it.
            CropForeground(select_fn=head_foreground, margin=_margin_voxels(preset), allow_smaller=False),
            ResizeWithPadOrCrop(spatial_size=preset.shape, method="symmetric", mode="constant"),
            NormalizeIntensity(nonzero=True, dtype=np.float32),
        ]
    )


def _margin_voxels(preset: Preset) -> int:
    return int(np.ceil(HEAD_MARGIN_MM / preset.spacing_mm))


def preprocess_volume(path: str | Path, preset: Preset) -> np.ndarray:
    """Run the preprocessing pipeline on one file: `1, D, H, W` float32 numpy array.

    Raises `PreprocessingError` naming the file when it cannot be read or yields no usable volume.
    """
    path = Path(path)
    return _checked_array(path, _run_pipeline(path, preprocessing_transform(preset)), preset)


def _run_pipeline(path: Path, transform: Compose) -> MetaTensor:
    try:
        return transform(str(path))
    except Exception as error:  # any failure becomes a named, plain reason
        raise PreprocessingError(path, f"cannot preprocess: {_plain_reason(path, error)}") from error


def _checked_array(path: Path, volume: torch.Tensor, preset: Preset) -> np.ndarray:
    """The pipeline's output as a plain array, refused when it is not a usable model input."""
    array = np.ascontiguousarray(torch.as_tensor(volume).numpy(), dtype=np.float32)
    expected = (1, *preset.shape)
    if array.shape != expected:
        raise PreprocessingError(path, f"preprocessing gave shape {array.shape}, expected {expected}")
    if not np.isfinite(array).all():
        raise PreprocessingError(path, "preprocessing produced NaN or infinite values")
    brain_fraction = float(np.count_nonzero(array)) / array.size
    if brain_fraction == 0.0:
        raise PreprocessingError(path, "no brain voxels left after preprocessing (empty image)")
    if brain_fraction < MIN_BRAIN_FRACTION:
        raise PreprocessingError(
            path,
            f"only {100 * brain_fraction:.2f}% of the grid is brain after preprocessing "
            f"(under {100 * MIN_BRAIN_FRACTION:g}%): not a brain image, or mostly negative intensities",
        )
    return array


@dataclass(frozen=True)
class PreprocessedScan:
    """One scan's model input together with the record MONAI kept of every spatial step, so that a
    volume on the model's grid (a reconstruction, a forecast) can be put back on the scan's own grid."""

    path: Path
    volume: np.ndarray  # [1, D, H, W] float32: exactly what `preprocess_volume` returns
    original_shape: tuple[int, ...]  # the stored array's shape (trailing singleton dimensions included)
    original_affine: np.ndarray  # 4 x 4, voxel -> RAS+ mm, as nibabel reads the file
    _transform: Compose
    _tracked: MetaTensor  # the pipeline's output with its `applied_operations`

    def to_original(self, volume: np.ndarray | torch.Tensor) -> np.ndarray:
        """A `[D, H, W]` (or `[1, D, H, W]`) volume on the preset grid → an array of `original_shape`
        in the scan's voxel space.

        MONAI's `Compose.inverse` undoes, in reverse order, the pad/crop, the head crop (zeros outside
        it), the resampling (trilinear, back to the stored voxel grid) and the reorientation. The
        intensity steps (background suppression, z-score) have no inverse: values stay in z-score units.
        """
        values = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32).reshape(self.volume.shape)
        tracked = MetaTensor(values, meta=copy.deepcopy(self._tracked.meta),
                             applied_operations=copy.deepcopy(self._tracked.applied_operations))
        inverted = self._transform.inverse(tracked)  # [1, X, Y, Z]
        affine = np.asarray(inverted.affine, dtype=np.float64)
        if not np.allclose(affine, self.original_affine, atol=1e-4):
            raise PreprocessingError(self.path, "the inverse of the preprocessing did not return to the scan's affine")
        array = np.asarray(torch.as_tensor(inverted).detach().cpu().numpy()[0], dtype=np.float32)
        return array.reshape(self.original_shape)


def check_scan_file(path: str | Path) -> None:
    """Refuse a scan that no site check has seen (a path given on the command line) for the site check's
    own reason (not NIfTI, truncated, 4-D, NaN, empty…), which says more than a failed pipeline step."""
    path = Path(path)
    excluded = [problem for problem in check_image(path) if problem.excluded]
    if excluded:
        raise PreprocessingError(path, excluded[0].reason)


def preprocess_invertible(path: str | Path, preset: Preset) -> PreprocessedScan:
    """`check_scan_file` then `preprocess_volume`, keeping what is needed to map model-grid volumes back
    to the scan's grid. Raises `PreprocessingError` naming the file.
    """
    path = Path(path)
    check_scan_file(path)
    transform = preprocessing_transform(preset)
    tracked = _run_pipeline(path, transform)
    array = _checked_array(path, tracked, preset)
    header = nib.load(path)  # the same reader the pipeline used: shape and affine without the voxels
    return PreprocessedScan(path, array, tuple(int(s) for s in header.shape), np.asarray(header.affine, dtype=np.float64),
                            transform, tracked)


def _plain_reason(path: Path, error: BaseException) -> str:
    """MONAI reports a file it cannot read as "cannot find a suitable reader" after trying every reader;
    the site check's own reading says what is actually wrong with the file."""
    problems = check_image(path)
    if problems:
        return problems[0].reason
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def preprocessing_fingerprint(preset: Preset) -> str:
    """sha256 of everything that changes the preprocessed output; part of every cache key.

    The MONAI version is included because resampling details can change between releases.
    Augmentation is not: it runs after the cache.
    """
    settings = {
        "version": PREPROCESSING_VERSION,
        "steps": "load-orient-resample-background-crop-pad-zscore",
        "monai": monai.__version__,
        "shape": list(preset.shape),
        "spacing_mm": preset.spacing_mm,
        "orientation": ORIENTATION,
        "interpolation": INTERPOLATION,
        "background": {"fraction": BACKGROUND_FRACTION, "percentile": BACKGROUND_PERCENTILE},
        "foreground": {"method": "otsu-subsampled2-largest-component", "bins": OTSU_BINS, "margin_mm": HEAD_MARGIN_MM},
        "pad_crop": "symmetric-constant-0",
        "normalise": "zscore-nonzero",
        "dtype": "float32",
        "min_brain_fraction": MIN_BRAIN_FRACTION,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


class RandShiftBrainIntensity(Randomizable, Transform):
    """MONAI `RandShiftIntensity` applied to brain (non-zero) voxels only.

    Shifting the whole volume would lift the background off 0 and hand the model a trivial cue (the
    background level) instead of a change in tissue contrast.
    """

    def __init__(self, offset: float = INTENSITY_SHIFT, prob: float = 1.0) -> None:
        self._shift = RandShiftIntensity(offsets=offset, prob=prob)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandShiftBrainIntensity:
        self._shift.set_random_state(seed=seed, state=state)
        return self

    def randomize(self, data: object = None) -> None:
        self._shift.randomize(data)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:  # C, D, H, W
        brain = image != 0
        shifted = self._shift(image)
        return torch.where(brain, torch.as_tensor(shifted), torch.zeros_like(image))


def augmentation_transform(flip_axes: tuple[int, ...] = (0, 1, 2)) -> Compose:
    """Training augmentation on a preprocessed `C, D, H, W` tensor: flips and a brain intensity shift.

    Each spatial axis is flipped independently with probability 0.5, as in the author's code. Only the
    left-right flip (axis 0, D) yields a plausible brain; pass `flip_axes=(0,)` to keep anatomy upright.
    """
    flips = [RandFlip(prob=FLIP_PROBABILITY, spatial_axis=axis) for axis in flip_axes]
    return Compose([*flips, RandShiftBrainIntensity()])


def preprocessed_volume_key(path: str | Path, preset: Preset) -> str:
    """Cache key of a scan's preprocessed volume: preprocessing fingerprint + the file's content hash."""
    return f"vol-{preprocessing_fingerprint(preset)[:16]}-{file_sha256(path)}"


def preprocess_scan(path: str | Path, preset: Preset, cache: ArrayCache | None) -> np.ndarray:
    """The preset's model input for one scan, `[1, D, H, W]` float32, from the cache when possible.

    Raises `PreprocessingError` (naming the file) when the scan cannot be preprocessed.
    """
    if cache is None:
        return preprocess_volume(path, preset)
    return cache.get_or_compute(preprocessed_volume_key(path, preset), lambda: preprocess_volume(path, preset))
