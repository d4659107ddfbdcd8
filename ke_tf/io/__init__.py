"""Files and output: params files (atomic writes, restricted unpickler), tables/JSON/plots,
progress bars and log lines."""
