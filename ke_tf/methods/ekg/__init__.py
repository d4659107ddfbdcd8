"""EKG filter pruning (ECCV 2022): gated search guided by an ensemble of interim sub-networks, slicing, fine-tuning."""
