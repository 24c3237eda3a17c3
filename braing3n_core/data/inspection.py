"""One image file: can it be read and used, and what is its geometry (`check_image`, `Problem`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

CHECKS_VERSION = 2  # 2: an all-NaN image is one problem, not also "all voxels are zero"


MIN_AFFINE_DETERMINANT = 1e-6  # mm³ per voxel; below this the voxel-to-world map is not invertible


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file; `excluded` says whether that file is left out."""

    path: Path
    reason: str
    excluded: bool

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class ImageInspection:
    """What reading one image taught us: its problems and, when readable, its geometry."""

    problems: tuple[Problem, ...]
    voxel_sha256: str | None = None  # hash of the voxel values: equal for the same scan saved twice
    shape: tuple[int, ...] | None = None
    voxel_size_mm: tuple[float, ...] | None = None
    orientation: str | None = None  # nibabel axis codes of the stored array, e.g. "LAS"

    @property
    def usable(self) -> bool:
        return not any(p.excluded for p in self.problems)


def check_image(path: str | Path) -> list[Problem]:
    """Read one image fully and list what makes it unusable; never raises on bad data."""
    return list(inspect_image(path).problems)


def inspect_image(path: str | Path, quiet: bool = True) -> ImageInspection:
    """`check_image` plus the geometry and voxel hash, for reports and duplicate detection.

    `quiet=False` leaves nibabel's logger alone: a caller inspecting many files from threads holds
    `quiet_nibabel()` around all of them (the logger level is process-wide)."""
    if not quiet:
        return _inspect_guarded(Path(path))
    with quiet_nibabel():
        return _inspect_guarded(Path(path))


@contextmanager
def quiet_nibabel() -> Iterator[None]:
    """nibabel logs header fixes ("pixdim[1,2,3] should be non-zero…") to stderr without naming the
    file; the checks report those conditions themselves, with the file name."""
    previous = nib.imageglobals.logger.level
    nib.imageglobals.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        nib.imageglobals.logger.setLevel(previous)


def _inspect_guarded(path: Path) -> ImageInspection:
    try:
        return _inspect(path)
    except Exception as error:  # a check must never take the site check down
        return ImageInspection((Problem(path, f"unreadable ({type(error).__name__}: {error})", True),))


def _inspect(path: Path) -> ImageInspection:
    def failed(reason: str, **geometry: Any) -> ImageInspection:
        return ImageInspection((Problem(path, reason, True),), **geometry)

    if not path.is_file():
        return failed("file not found")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for non-images
        return failed(f"unreadable: not a NIfTI image ({_load_failure(error, path)})")
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        return failed(f"not a NIfTI image (read as {type(image).__name__})")

    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 3:
        return failed(f"{len(shape)}-D image (shape {shape}); expected a 3-D volume", shape=shape)
    if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
        return failed(
            f"{len(shape)}-D image (shape {shape}) holds {int(np.prod(shape[3:]))} volumes; expected one 3-D volume",
            shape=shape,
        )

    problems: list[Problem] = []
    voxel_size = _stored_voxel_size(path, image)
    if any(not np.isfinite(s) or s <= 0 for s in voxel_size):
        problems.append(Problem(path, f"zero or negative voxel size {voxel_size} mm in the header", True))
    affine = image.affine
    determinant = float(np.linalg.det(affine[:3, :3])) if np.isfinite(affine).all() else float("nan")
    orientation = None
    if not np.isfinite(determinant) or abs(determinant) < MIN_AFFINE_DETERMINANT:
        problems.append(
            Problem(path, f"singular affine (determinant {determinant:.3g}): voxel positions are undefined", True)
        )
    else:
        orientation = "".join(nib.aff2axcodes(affine))
    geometry = {"shape": shape, "voxel_size_mm": voxel_size, "orientation": orientation}

    try:
        data = np.asanyarray(image.dataobj).reshape(shape[:3])  # scaling (scl_slope/inter) applied
    except (EOFError, zlib.error, OSError, ValueError) as error:
        return ImageInspection(
            (*problems, Problem(path, f"truncated or corrupt image data ({_one_line(error, path)})", True)), **geometry
        )

    if np.issubdtype(data.dtype, np.floating):
        n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if n_nan or n_inf:
            problems.append(Problem(path, f"contains {n_nan} NaN and {n_inf} infinite voxels", True))
    finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
    if finite.size == 0:
        pass  # every voxel NaN or infinite: already said above, and "all zero" would be false
    elif not finite.any():
        problems.append(Problem(path, "all voxels are zero (empty image)", True))
    elif finite.min() == finite.max():
        problems.append(Problem(path, f"every voxel has the same value ({finite.min():g}); no anatomy", True))

    digest = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    return ImageInspection(tuple(problems), voxel_sha256=digest.hexdigest(), **geometry)


def _stored_voxel_size(path: Path, image: nib.Nifti1Image) -> tuple[float, ...]:
    """Voxel size as written in the file: nibabel silently turns zero or negative sizes into valid ones
    on load, which would hide exactly what this check looks for."""
    header_class = type(image.header)
    with ImageOpener(path) as handle:
        raw = handle.read(header_class.sizeof_hdr)
    header = header_class.from_fileobj(io.BytesIO(raw), check=False)
    return tuple(float(s) for s in header["pixdim"][1:4])


def _load_failure(error: BaseException, path: Path) -> str:
    """Why nibabel could not open the file, in the words of someone who named it `.nii.gz`."""
    if path.name.endswith(".gz") and "not a gzip file" in str(error):
        return "named .gz but not gzip-compressed"
    return _one_line(error, path)


def _one_line(error: BaseException, path: Path) -> str:
    """The library's message on one line, without repeating the path the problem already names."""
    message = str(error)
    for spelling in (f"File {path}", f"file {path}", f'"{path}"', f"'{path}'", str(path)):
        message = message.replace(spelling, "the file")
    return " ".join(message.split()) or type(error).__name__
