"""Layer 1, boards: profiles (`builtin/*.toml`, user TOML files) and latency estimates."""
