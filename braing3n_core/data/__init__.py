"""A site's data: BIDS discovery, checks, MONAI preprocessing, caches and PyTorch datasets.

- `bids`: find scans and their labels (`discover_scans` → `ScanRecord`s);
- `checks`: validate images and a whole site (`check_site` → `SiteReport`, `braing3n site check`);
- `transforms`: MONAI preprocessing to a preset's input grid, and training augmentation;
- `cache`: content-addressed on-disk caches (`ArrayCache`, `preprocess_scan`);
- `datasets`: subject-level splits, `VolumeDataset`, and `load_site`, the trainers' entry point;
- `cohort`: the synthetic multi-site cohort generator.

Submodules are imported explicitly (`from braing3n_core.data.datasets import load_site`), so that
importing one of them does not pull in torch and MONAI for the others.
"""
