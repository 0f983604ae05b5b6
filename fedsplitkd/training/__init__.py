"""Whole-model training for the baselines (FedAvg, FedProx, local, FD, FedGKT), plain PyTorch."""
