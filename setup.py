"""ke_tf: Knowledge Evolution, distillation, incremental learning, EKG pruning and knowledge
consistency for TensorFlow 2 / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="ke_tf",
    version="0.1.0",
    description="Knowledge Evolution, KD/ReduceNet, LwM, EKG pruning and knowledge consistency in TF2/Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ (the only copy of the experiment configs) is installed as package data ke_tf/configs.
    packages=find_packages(include=["ke_tf", "ke_tf.*"]) + ["ke_tf.configs"],
    package_dir={"ke_tf.configs": "configs"},
    package_data={"ke_tf.configs": ["*.yaml"]},
    entry_points={
        "console_scripts": [
            "ke-tf-train = ke_tf.cli:train_command",
            "ke-tf-test = ke_tf.cli:test_command",
            "ke-tf-export = ke_tf.cli:export_command",
        ]
    },
    python_requires=">=3.9",
    install_requires=[
        "tensorflow>=2.16",
        "tensorflow-datasets",
        "numpy",
        "tqdm",
        "pyyaml",
        # tf.summary needs it since TF 2.21 stopped depending on it; TensorBoard logs are a feature.
        "tensorboard",
    ],
    extras_require={
        # setuptools, wheel: the test that builds a wheel; ruff pinned: its formatter's style changes
        # between releases, and `ruff format --check` in .ci/run must mean the same on every machine.
        # ai-edge-litert: the LiteRT interpreter that runs deployed models' TFLite files in tests/test_deploy.py.
        "test": ["pytest", "setuptools", "wheel", "ruff==0.17.6", "ai-edge-litert"],
        "demo": ["scikit-learn"],
        "plot": ["matplotlib"],
        # ke_tf.convert reading PyTorch checkpoints (KE, ReduceNet); never needed by the core or tests.
        "convert": ["torch"],
    },
)
