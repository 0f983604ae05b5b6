"""Tools around runs: the benchmark harness, local deployments and private simulations."""
