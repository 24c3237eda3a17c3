"""Subject-level splits, the volume dataset and `load_site` on a small real BIDS site."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from braing3n_core.data import transforms
from braing3n_core.data.bids import ScanRecord
from braing3n_core.data.datasets import SPLITS, VolumeDataset, labels_to_tensors, load_site, split_subjects
from braing3n_core.labels import DIAGNOSES, Modality, ScanLabels
from braing3n_core.presets import PRESETS
from braing3n_core.site_config import SiteConfig, SplitConfig

TINY = PRESETS["tiny"]


def _records(n_subjects: int, site_id: str = "site-a", first: int = 0) -> list[ScanRecord]:
    """Subjects with 1-3 sessions and 1-4 modalities each (no files: splits read names only)."""
    records = []
    for i in range(first, first + n_subjects):
        for s in range(1 + i % 3):
            for modality in list(Modality)[: 1 + i % 4]:
                records.append(
                    ScanRecord(
                        site_id,
                        f"sub-{i:03d}",
                        f"ses-{s:02d}",
                        modality,
                        Path(f"/x/{i}/{s}/{modality.value}"),
                        ScanLabels(),
                    )
                )
    return records


def _assignment(splits: dict[str, list[ScanRecord]]) -> dict[str, str]:
    return {r.subject: name for name, records in splits.items() for r in records}


def test_split_keeps_subjects_whole_and_respects_fractions() -> None:
    records = _records(100)
    splits = split_subjects(records, SplitConfig(seed=3, train=0.7, val=0.15, test=0.15))

    assert sorted(r.key for s in splits.values() for r in s) == sorted(r.key for r in records)
    subjects = {name: {r.subject for r in split} for name, split in splits.items()}
    assert not (
        subjects["train"] & subjects["val"]
        or subjects["train"] & subjects["test"]
        or subjects["val"] & subjects["test"]
    )
    assert {name: len(s) for name, s in subjects.items()} == {"train": 70, "val": 15, "test": 15}


def test_split_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    records = _records(60)
    config = SplitConfig(seed=7)
    assert _assignment(split_subjects(records, config)) == _assignment(split_subjects(list(reversed(records)), config))
    assert _assignment(split_subjects(records, config)) != _assignment(split_subjects(records, SplitConfig(seed=8)))


def test_adding_subjects_moves_few_existing_ones_and_never_test_into_train() -> None:
    config = SplitConfig(seed=1)
    before = _assignment(split_subjects(_records(80), config))
    after = _assignment(split_subjects(_records(80) + _records(5, first=500), config))

    moved = {s: (before[s], after[s]) for s in before if before[s] != after[s]}
    assert len(moved) <= 5
    assert all(move != ("test", "train") for move in moved.values())


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_small_sites_fill_train_first_then_every_split(n: int) -> None:
    counts = Counter(_assignment(split_subjects(_records(n), SplitConfig())).values())
    assert sum(counts.values()) == n and counts["train"] >= 1
    if n >= 3:
        assert all(counts[name] >= 1 for name in SPLITS)


def test_same_subject_id_at_two_sites_is_two_subjects() -> None:
    records = _records(10, "site-a") + _records(10, "site-b")
    splits = split_subjects(records, SplitConfig())
    assert sum(len({(r.site_id, r.subject) for r in s}) for s in splits.values()) == 20


def test_labels_to_tensors_marks_missing_values() -> None:
    records = [
        ScanRecord(
            "s",
            "sub-1",
            None,
            Modality.T2W,
            Path("a"),
            ScanLabels(age=70.0, sex="M", diagnosis="AD", mmse=21.0, field_strength=3.0),
        ),
        ScanRecord("s", "sub-2", None, Modality.T1W, Path("b"), ScanLabels()),
    ]
    tensors = labels_to_tensors(records)

    assert tensors["age"][0] == 70.0 and math.isnan(tensors["age"][1])
    assert tensors["sex"].tolist() == [1, -1]
    assert tensors["diagnosis"].tolist() == [DIAGNOSES.index("AD"), -1]
    assert tensors["modality"].tolist() == [2, 0]
    assert math.isnan(tensors["mmse"][1]) and math.isnan(tensors["field_strength"][1])


# --- a real site ----------------------------------------------------------------------------------------


@pytest.fixture()
def site_root(nibabel_data_dir: Path, tmp_path: Path) -> Path:
    """Eight subjects from nibabel's real T1 crop, stored LAS and RAS, one with two sessions, plus one
    scan that passes the checks (finite, non-constant) but holds no positive intensity to preprocess."""
    anatomy = nib.load(nibabel_data_dir / "anatomical.nii")
    data = np.asarray(anatomy.dataobj, np.float32)
    root = tmp_path / "bids"
    rows = ["participant_id\tsex\tage\tdiagnosis\tmmse"]
    for i in range(1, 9):
        sessions = ["ses-01", "ses-02"] if i == 1 else ["ses-01"]
        for s, session in enumerate(sessions):
            image = nib.Nifti1Image(data * (1 + i / 10 + s / 100), anatomy.affine)
            if i % 2:  # the same anatomy stored RAS instead of LAS
                image = image.as_reoriented(
                    nib.orientations.ornt_transform(
                        nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(("R", "A", "S"))
                    )
                )
            path = root / f"sub-{i:02d}/{session}/anat/sub-{i:02d}_{session}_T1w.nii.gz"
            path.parent.mkdir(parents=True)
            nib.save(image, path)
        rows.append(f"sub-{i:02d}\t{'FM'[i % 2]}\t{55 + 3 * i}\t{DIAGNOSES[i % 3]}\t{22 + i % 8}")
    negative = root / "sub-09/ses-01/anat/sub-09_ses-01_T1w.nii.gz"
    negative.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(-np.abs(data) - 1.0, anatomy.affine), negative)
    rows.append("sub-09\tF\t70\tCN\t29")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def _config(root: Path, tmp_path: Path) -> SiteConfig:
    return SiteConfig(
        site_id="site-a",
        data_root=root,
        cache_dir=tmp_path / "cache",
        split=SplitConfig(seed=0, train=0.5, val=0.25, test=0.25),
    )


def test_load_site_excludes_scans_that_fail_preprocessing_and_splits_the_rest(site_root: Path, tmp_path: Path) -> None:
    data = load_site(_config(site_root, tmp_path), TINY, progress=False)

    assert len(data.records) == 9 and all(r.subject != "sub-09" for r in data.records)
    failed = [p for p in data.problems if "preprocessing failed" in p.reason]
    assert len(failed) == 1 and failed[0].path.name == "sub-09_ses-01_T1w.nii.gz" and failed[0].excluded
    assert "no brain voxels" in failed[0].reason
    assert sum(len(s) for s in data.splits.values()) == 9
    split_of = _assignment(data.splits)
    assert split_of["sub-01"] in SPLITS and len({r.subject for r in data.splits["train"]}) >= 3


def test_dataset_samples_collate_and_map_back_to_labels(site_root: Path, tmp_path: Path) -> None:
    data = load_site(_config(site_root, tmp_path), TINY, progress=False)
    dataset = data.dataset("train", augment=False)
    batch = next(iter(DataLoader(dataset, batch_size=2, shuffle=False)))

    assert batch["volume"].shape == (2, 1, *TINY.shape) and batch["volume"].dtype == torch.float32
    assert type(batch["volume"]) is torch.Tensor  # no MetaTensor leaks into batches
    labels = labels_to_tensors([dataset.records[i] for i in batch["index"].tolist()])
    assert labels["age"].shape == (2,) and not torch.isnan(labels["age"]).any()
    for volume in batch["volume"]:
        brain = volume[volume != 0]
        assert abs(float(brain.mean())) < 1e-3 and abs(float(brain.std()) - 1) < 1e-2


def test_second_load_does_no_preprocessing(site_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_site(_config(site_root, tmp_path), TINY, progress=False)
    calls: list[Path] = []
    real = transforms.preprocess_volume

    def counting(path: Path, preset: object) -> np.ndarray:
        calls.append(path)
        return real(path, preset)

    monkeypatch.setattr(transforms, "preprocess_volume", counting)
    second = load_site(_config(site_root, tmp_path), TINY, progress=False)
    volumes = [
        second.dataset(name, augment=False)[i]["volume"] for name in SPLITS for i in range(len(second.splits[name]))
    ]

    # The only scan computed again is the one that failed (failures are not cached).
    assert [p.name for p in calls] == ["sub-09_ses-01_T1w.nii.gz"]
    assert [r.key for r in second.records] == [r.key for r in first.records]
    assert len(volumes) == 9
    fresh = real(second.splits["train"][0].path, TINY)
    assert second.dataset("train", augment=False)[0]["volume"].numpy().tobytes() == fresh.tobytes()


def test_scan_broken_after_loading_is_skipped_not_fatal(site_root: Path, tmp_path: Path) -> None:
    data = load_site(_config(site_root, tmp_path), TINY, prepare=False, progress=False)
    dataset = VolumeDataset([r for r in data.records if r.subject != "sub-09"], TINY, cache=None)
    broken = dataset.records[2].path
    content = broken.read_bytes()
    broken.write_bytes(content[: len(content) // 2])  # truncated on disk mid-training

    indices = [dataset[i]["index"] for i in range(len(dataset))]

    assert 2 not in indices and indices[2] == 3  # the next scan stands in, with its own index
    assert [p.path for p in dataset.failures] == [broken]
    assert "preprocessing failed during training" in dataset.failures[0].reason
    assert "truncated or corrupt image data" in dataset.failures[0].reason


def test_training_augmentation_varies_and_keeps_background_zero(site_root: Path, tmp_path: Path) -> None:
    data = load_site(_config(site_root, tmp_path), TINY, progress=False)
    plain = data.dataset("train", augment=False)[0]["volume"]
    augmented = data.dataset("train")
    torch.manual_seed(0)
    samples = [augmented[0]["volume"] for _ in range(4)]

    assert any(not torch.equal(samples[0], s) for s in samples[1:])
    assert all(int((s == 0).sum()) == int((plain == 0).sum()) for s in samples)


# --- the synthetic cohort (tests/conftest.py) ----------------------------------------------------------


def test_synthetic_cohort_sites_load_whole(synthetic_cohort: list[Path], tmp_path: Path) -> None:
    """The generator's BIDS output parses with no problem and full labels; one scan per modality and
    split preprocesses at `tiny` (preprocessing every scan would triple this test's time)."""
    for site_yaml in synthetic_cohort:
        config = SiteConfig.from_yaml(site_yaml)
        # The cohort folder is shared by the session's tests: keep this test's cache out of it.
        config = config.model_copy(update={"cache_dir": tmp_path / config.site_id})
        data = load_site(config, TINY, prepare=False, progress=False)

        assert data.problems == [], [str(p) for p in data.problems]
        assert len(data.records) == len(data.report.all_scans) > 6
        assert all(data.report.completeness[name] == 1.0 for name in ("age", "sex", "diagnosis", "field_strength"))
        assert {r.modality for r in data.records} == set(config.modalities)
        subjects = [{r.subject for r in data.splits[name]} for name in SPLITS]
        assert all(subjects) and not (
            subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2]
        )
        longitudinal = [r for r in data.records if r.session not in (None, "ses-01")]
        assert longitudinal and all(r.labels.age is not None for r in longitudinal)

        picks = {r.modality: r for r in data.records} | {name: data.splits[name][0] for name in SPLITS}
        dataset = VolumeDataset(list(picks.values()), TINY, data.cache)
        for i in range(len(dataset)):
            volume = dataset[i]["volume"]
            brain = volume[volume != 0]
            assert volume.shape == (1, *TINY.shape) and abs(float(brain.mean())) < 1e-3
            assert 0.1 < brain.numel() / volume.numel() < 0.7
        assert dataset.failures == []
