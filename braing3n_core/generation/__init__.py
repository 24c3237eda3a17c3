"""Generation with a trained DiT and decoder: loading a run's models, sampling, forecasting, NIfTI and montage output."""
