"""transferlab: run, compare and reuse transfer-learning experiments for image classification.

Python API::

    import transferlab
    result = transferlab.run_study("studies/demo.yaml", runs_dir="runs")
    rows = transferlab.compare("runs/fashion_mnist_demo")
    run = transferlab.load_run("runs/fashion_mnist_demo/cnn_scratch")
    model = run.load_model()
    result = transferlab.export_run("runs/fashion_mnist_demo/cnn_scratch", "onnx")  # + parity check
    doc = transferlab.auto("my_images/", budget="15m")  # choose a model within a time budget
"""

from importlib import metadata

from transferlab import tools  # noqa: F401 - registers the predict: / activations: run sections
from transferlab.config import ConfigError, ExperimentConfig, Study, load_study, parse_study
from transferlab.kinds import run_experiment
from transferlab.results import trackers  # noqa: F401 - registers the trackers (tracking: [...])
from transferlab.results.compare import compare
from transferlab.results.export import export_run
from transferlab.rundir import Run, load_run
from transferlab.study import StudyResult, run_study
from transferlab.tools.auto import auto

try:
    __version__ = metadata.version("transferlab")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "Run",
    "Study",
    "StudyResult",
    "__version__",
    "auto",
    "compare",
    "export_run",
    "load_run",
    "load_study",
    "parse_study",
    "run_experiment",
    "run_study",
]
