"""Synthetic multi-site BIDS cohort from real anatomy (nilearn's ICBM152), for tests, demos and benchmarks.

Modules, one per concept: `anatomy` (template maps, ventricles, hippocampal region), `sites` (non-IID
site profiles), `subjects` (demographics and disease course per visit), `grid` (sampling grids),
`effects` (deformation, atrophy, lesions, tumour), `scanner` (contrast, bias, noise, geometry, NIfTI
encoding), `bids_writer` (BIDS files), `generate` (`make_cohort`).
"""

from braing3n_core.data.cohort.generate import CohortSpec, CohortSummary, existing_cohort, make_cohort, summarize_cohort

__all__ = ["CohortSpec", "CohortSummary", "existing_cohort", "make_cohort", "summarize_cohort"]
