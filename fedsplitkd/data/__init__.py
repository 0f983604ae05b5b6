"""Datasets: where they come from, the server's splits, the devices' partitions and files."""
