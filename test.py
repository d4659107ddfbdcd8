"""Evaluate a pickled ke_tf params file (the installed `ke-tf-test` command).

python test.py --trained_param runs/quickstart/trained_params.pkl [--json out.json] [--export DIR]
"""

from ke_tf.cli import evaluate_main as main
from ke_tf.cli import evaluate_params_file

__all__ = ["evaluate_params_file", "main"]

if __name__ == "__main__":
    main()
