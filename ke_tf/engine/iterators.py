"""Releasing finished tf.data iterators without waiting for them.

Destroying an autotuned tf.data iterator can block, idle, for up to a minute (the README's "How a
run works" has the measurement), so the engine drops its last reference on a background thread
and the wait overlaps what comes next. The thread is not a daemon: a daemon returning from
TensorFlow during interpreter shutdown can abort the process.
"""

import threading


def release_in_background(holder):
    """Empty the list `holder` now and drop its items on a background thread; give the iterator
    to the engine only through such a list, so that no other reference keeps it alive."""
    held = holder[:]
    holder.clear()
    thread = threading.Thread(target=held.clear, name="ke_tf-release-iterator")
    thread.start()
    return thread
