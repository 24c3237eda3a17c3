"""MONAI preprocessing on real anatomy: nibabel's anatomical.nii and nilearn's ICBM152 template."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from braing3n_core.data import transforms
from braing3n_core.data.transforms import (
    PreprocessingError,
    augmentation_transform,
    preprocess_volume,
    preprocessing_fingerprint,
    preprocessing_transform,
)
from braing3n_core.presets import PRESETS, Preset

TINY, SMALL = PRESETS["tiny"], PRESETS["small"]


@pytest.fixture(scope="module")
def template() -> nib.Nifti1Image:
    datasets = pytest.importorskip("nilearn.datasets", reason="nilearn provides the ICBM152 template")
    image = datasets.load_mni152_template(resolution=2)  # 99×117×95, 2 mm, RAS
    return nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)


def _save(image: nib.Nifti1Image, path: Path) -> Path:
    nib.save(image, path)
    return path


def _reoriented(image: nib.Nifti1Image, axcodes: str) -> nib.Nifti1Image:
    """The same scan stored with another voxel order: identical world positions, permuted/flipped array."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(tuple(axcodes))
    )
    return image.as_reoriented(transform)


def _brain_stats(volume: np.ndarray) -> tuple[float, float]:
    brain = volume[volume != 0]
    return float(brain.mean()), float(brain.std())


@pytest.mark.parametrize("preset", [TINY, SMALL], ids=lambda p: p.name)
def test_anatomical_big_endian_las_gives_preset_input(nibabel_data_dir: Path, preset: Preset) -> None:
    path = nibabel_data_dir / "anatomical.nii"
    image = nib.load(path)
    assert image.get_data_dtype().str == ">i2" and nib.aff2axcodes(image.affine) == ("L", "A", "S")

    volume = preprocess_volume(path, preset)

    assert volume.shape == (1, *preset.shape) and volume.dtype == np.float32
    mean, std = _brain_stats(volume)
    assert abs(mean) < 1e-3 and abs(std - 1.0) < 1e-3
    # The crop covers 66×82×50 mm, far less than the preset's field of view: the padding is background.
    assert (volume == 0).mean() > 0.5
    assert volume[0, 0].max() == 0 and volume[0, -1].max() == 0


def test_template_gives_zscored_brain_on_zero_background(template: nib.Nifti1Image, tmp_path: Path) -> None:
    volume = preprocess_volume(_save(template, tmp_path / "t.nii.gz"), SMALL)

    assert volume.shape == (1, *SMALL.shape)
    mean, std = _brain_stats(volume)
    assert abs(mean) < 1e-3 and abs(std - 1.0) < 1e-3
    # Background stays exactly zero after the z-score (the brain occupies under half the grid).
    assert 0.3 < (volume == 0).mean() < 0.8
    for corner in [(0, 0, 0), (-1, -1, -1), (0, -1, 0), (-1, 0, -1)]:
        assert volume[(0, *corner)] == 0
    assert np.isfinite(volume).all()


def test_output_is_lps_at_preset_spacing(template: nib.Nifti1Image, tmp_path: Path) -> None:
    path = _save(_reoriented(template, "LAS"), tmp_path / "las.nii.gz")
    volume = preprocessing_transform(SMALL)(str(path))  # MetaTensor, C, D, H, W
    affine = np.asarray(volume.affine)

    assert nib.aff2axcodes(affine) == ("L", "P", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), [SMALL.spacing_mm] * 3)


def test_marker_at_known_world_position_lands_on_the_lps_side(template: nib.Nifti1Image, tmp_path: Path) -> None:
    """A bright cube at MNI (x=-40, y=+40, z=+40) mm: patient left, anterior, superior."""
    data = np.asarray(template.dataobj).copy()
    i, j, k = np.round(np.linalg.inv(template.affine) @ [-40.0, 40.0, 40.0, 1.0])[:3].astype(int)
    data[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 10.0
    marked = nib.Nifti1Image(data, template.affine)
    centre = np.array(SMALL.shape) / 2

    positions = []
    for axcodes in ("RAS", "LAS", "PSL"):  # how sites store it; the output must not care
        volume = preprocess_volume(_save(_reoriented(marked, axcodes), tmp_path / f"{axcodes}.nii.gz"), SMALL)
        positions.append(np.unravel_index(np.argmax(volume[0]), SMALL.shape))

    assert positions[0] == positions[1] == positions[2]
    d, h, w = positions[0]
    assert d > centre[0] + 10  # D grows toward the patient's left: 40 mm left of centre ≈ 20 voxels
    assert h < centre[1] - 10  # H grows toward posterior: an anterior marker has a small index
    assert w > centre[2] + 10  # W grows toward superior


def test_same_brain_placement_for_any_storage_orientation_and_voxel_size(
    template: nib.Nifti1Image, tmp_path: Path
) -> None:
    reference_path = _save(template, tmp_path / "ras.nii.gz")
    reference = preprocess_volume(reference_path, SMALL)
    for axcodes in ("LAS", "LSA"):
        stored = preprocess_volume(_save(_reoriented(template, axcodes), tmp_path / f"{axcodes}.nii.gz"), SMALL)
        np.testing.assert_allclose(stored, reference, atol=1e-5)

    image_module = pytest.importorskip("nilearn.image")
    anisotropic = image_module.resample_img(
        template,
        target_affine=np.diag([2.0, 2.0, 3.5]),
        interpolation="continuous",
        force_resample=True,
        copy_header=True,
    )
    assert nib.affines.voxel_sizes(anisotropic.affine)[2] == pytest.approx(3.5)
    anisotropic_path = _save(anisotropic, tmp_path / "aniso.nii.gz")
    resampled = preprocess_volume(anisotropic_path, SMALL)

    # The brain's bounding box is found on voxels, so the grid may move by one voxel; at equal world
    # positions the anatomy must match.
    outputs = [preprocessing_transform(SMALL)(str(p)) for p in (reference_path, anisotropic_path)]
    affines = [np.asarray(o.affine) for o in outputs]
    shift = np.round((affines[1][:3, 3] - affines[0][:3, 3]) / np.diag(affines[0])[:3]).astype(int)
    assert np.abs(shift).max() <= 1
    ref_overlap, aniso_overlap = _overlap(outputs[0][0].numpy(), outputs[1][0].numpy(), shift)
    ref_brain, aniso_brain = ref_overlap != 0, aniso_overlap != 0
    common = ref_brain & aniso_brain
    assert 2 * common.sum() / (ref_brain.sum() + aniso_brain.sum()) > 0.95  # Dice of the brain masks
    assert np.corrcoef(ref_overlap[common], aniso_overlap[common])[0, 1] > 0.95
    np.testing.assert_array_equal(resampled, outputs[1].numpy())


def _overlap(reference: np.ndarray, other: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parts of two equal-shape grids that cover the same world voxels; other[i] ≙ reference[i + shift]."""
    ref_slices, other_slices = [], []
    for size, offset in zip(reference.shape, shift):
        ref_slices.append(slice(max(offset, 0), size + min(offset, 0)))
        other_slices.append(slice(max(-offset, 0), size + min(-offset, 0)))
    return reference[tuple(ref_slices)], other[tuple(other_slices)]


def test_off_centre_field_of_view_is_recentred_not_cut(template: nib.Nifti1Image, tmp_path: Path) -> None:
    """A scan whose field of view reaches far below the brain (neck) must give the same model input."""
    data = np.asarray(template.dataobj)
    pad_below = 60  # voxels of empty field of view under the brain, along the inferior-superior axis
    padded = np.concatenate([np.zeros((*data.shape[:2], pad_below), np.float32), data], axis=2)
    affine = template.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * pad_below  # same world position for every original voxel
    off_centre = preprocess_volume(_save(nib.Nifti1Image(padded, affine), tmp_path / "neck.nii.gz"), SMALL)
    reference = preprocess_volume(_save(template, tmp_path / "t.nii.gz"), SMALL)

    np.testing.assert_allclose(off_centre, reference, atol=1e-5)


@pytest.mark.parametrize("source", ["template", "anatomical"])
def test_crop_keeps_every_brain_voxel(
    source: str, template: nib.Nifti1Image, nibabel_data_dir: Path, tmp_path: Path
) -> None:
    """The head's bounding box (Otsu mask + margin) must never cut tissue that fits the preset grid."""
    path = _save(template, tmp_path / "t.nii.gz") if source == "template" else nibabel_data_dir / "anatomical.nii"
    pipeline = preprocessing_transform(SMALL)
    crop_at = next(i for i, t in enumerate(pipeline.transforms) if isinstance(t, transforms.CropForeground))
    before_crop = transforms.Compose(pipeline.transforms[:crop_at])(str(path))

    assert (preprocess_volume(path, SMALL) != 0).sum() == (before_crop != 0).sum()


def test_image_without_positive_voxels_is_a_named_preprocessing_error(tmp_path: Path) -> None:
    path = _save(
        nib.Nifti1Image(-np.arange(1000, dtype=np.float32).reshape(10, 10, 10), np.eye(4)), tmp_path / "neg.nii"
    )
    with pytest.raises(PreprocessingError, match=r"neg\.nii: no brain voxels"):
        preprocess_volume(path, TINY)


def test_image_with_a_few_positive_voxels_is_not_a_brain(nibabel_data_dir: Path, tmp_path: Path) -> None:
    anatomy = nib.load(nibabel_data_dir / "anatomical.nii")
    inverted = -np.asarray(anatomy.dataobj, np.float32)  # its few negative artefacts become positive
    path = _save(nib.Nifti1Image(inverted, anatomy.affine), tmp_path / "inverted.nii.gz")
    with pytest.raises(PreprocessingError, match=r"inverted.nii.gz: only .*% of the grid is brain"):
        preprocess_volume(path, TINY)


def test_unreadable_file_is_a_named_preprocessing_error(tmp_path: Path) -> None:
    path = tmp_path / "text.nii"
    path.write_text("not an image\n")
    with pytest.raises(PreprocessingError, match=r"text\.nii: cannot preprocess"):
        preprocess_volume(path, TINY)


def test_fingerprint_changes_with_anything_that_changes_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    base = preprocessing_fingerprint(SMALL)
    assert base == preprocessing_fingerprint(PRESETS["small"])
    assert len({base, preprocessing_fingerprint(TINY), preprocessing_fingerprint(PRESETS["paper"])}) == 3
    other_shape = dataclasses.replace(SMALL, shape=(80, 96, 88))
    assert preprocessing_fingerprint(other_shape) != base
    monkeypatch.setattr(transforms, "PREPROCESSING_VERSION", transforms.PREPROCESSING_VERSION + 1)
    assert preprocessing_fingerprint(SMALL) != base


def test_augmentation_flips_and_shifts_brain_only(nibabel_data_dir: Path) -> None:
    volume = torch.from_numpy(preprocess_volume(nibabel_data_dir / "anatomical.nii", TINY))
    background = volume == 0
    augment = augmentation_transform()

    outputs = []
    for seed in range(6):
        augment.set_random_state(seed=seed)
        out = torch.as_tensor(augment(volume.clone()))
        assert out.shape == volume.shape
        flipped_background = out == 0
        assert flipped_background.sum() == background.sum()  # background stays exactly 0, only moved
        outputs.append(out)
    augment.set_random_state(seed=3)
    np.testing.assert_array_equal(torch.as_tensor(augment(volume.clone())).numpy(), outputs[3].numpy())
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])
    shifts = {round(float(o[o != 0].mean() - volume[volume != 0].mean()), 4) for o in outputs}
    assert len(shifts) > 1 and all(abs(s) <= transforms.INTENSITY_SHIFT + 1e-4 for s in shifts)
