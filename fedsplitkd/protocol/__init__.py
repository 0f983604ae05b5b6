"""The split-KD protocol in plain PyTorch: the device and edge-server halves of a round, their payloads, the KD loss."""
