"""Privacy: subject-level DP-SGD (`dp`), the site's privacy ledger and hard budget (`ledger`), and the
federated audit of synthetic data (`audit`)."""
