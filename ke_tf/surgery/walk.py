"""Walking and re-running the recorded graph of a functional Keras 3 model (layers and the
non-layer operations Keras 3 records, such as `x + y` on KerasTensors)."""

import keras


def is_functional(model):
    """True for a model Keras built from a recorded graph (functional or Sequential)."""
    return hasattr(model, "_nodes_by_depth") and hasattr(model, "inputs") and model.inputs is not None


def functional_nodes(model):
    """The call nodes of `model`'s own graph in topological order (input placeholders excluded)."""
    by_depth = model._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth] if not node.is_input]


def rerun(model, inputs, call):
    """Rebuild `model`'s graph on new symbolic `inputs`: every node's outputs are
    `call(node, args, kwargs)` with the arguments mapped to the new tensors. Returns the outputs
    (a list, in `model.outputs` order)."""
    tensors = {id(x): y for x, y in zip(model.inputs, inputs)}
    for node in functional_nodes(model):
        args, kwargs = node.arguments.fill_in(tensors)
        outputs = call(node, args, kwargs)
        for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
            tensors[id(x)] = y
    return [tensors[id(x)] for x in model.outputs]
