"""Distillation: Hinton KD, Born-Again Networks and ReduceNet (teacher with a reducible branch, fused student)."""
