"""Incremental learning without memorizing (LwM, Dhar et al., CVPR 2019): KD + Grad-CAM attention distillation."""
