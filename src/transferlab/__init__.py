"""transferlab: run, compare and reuse transfer-learning experiments for image classification.

Python API::

    import transferlab
    result = transferlab.run_study("studies/demo.yaml", runs_dir="runs")
    rows = transferlab.compare("runs/fashion_mnist_demo")
    run = transferlab.load_run("runs/fashion_mnist_demo/cnn_scratch")
    model = run.load_model()
"""

__version__ = "0.1.0"

from transferlab.compare import compare
from transferlab.config import ConfigError, ExperimentConfig, Study, load_study, parse_study
from transferlab.runs import Run, load_run, run_experiment
from transferlab.study import StudyResult, run_study

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "Run",
    "Study",
    "StudyResult",
    "__version__",
    "compare",
    "load_run",
    "load_study",
    "parse_study",
    "run_experiment",
    "run_study",
]
