"""own_model: a Flower app of its own (quickstart-pytorch style), trained with split-KD."""
