"""Plain supervised training of one network (the quickstart and the teachers of other methods)."""
