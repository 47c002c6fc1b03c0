"""One small study, run once per test session, shared by the report, predict, activations and sweep tests.

``tiny_study_dir(tmp_root)`` runs (on the CPU, a few seconds) a study on the ``synthetic`` dataset with
``transferlab_cnn``: ``scratch`` over two seeds, a ``head.dropout`` sweep with two points, and one
experiment that fails (a weights file that does not exist, with HTML in its path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

STUDY = {
    "study": "tiny_report",
    "defaults": {
        "data": {"dataset": "synthetic", "synthetic_size": 96, "val_fraction": 0.25},
        "model": {"backbone": "transferlab_cnn"},
        "train": {"epochs": 4, "batch_size": 32, "lr": 0.01, "progress": False, "accelerator": "cpu"},
    },
    "experiments": [
        {"name": "scratch", "strategy": {"name": "scratch"}, "sweep": {"seed": [0, 1]}},
        {"name": "dropout", "head": {"type": "mlp", "hidden": 16}, "sweep": {"head.dropout": [0.1, 0.3]}},
        {"name": "broken", "model": {"backbone": "resnet18", "weights": "file:/nonexistent/<b>weights</b>.safetensors"}},
    ],
}
RUNS = ["scratch.seed0", "scratch.seed1", "dropout@head.dropout=0.1", "dropout@head.dropout=0.3", "broken"]

_cache: dict[str, Path] = {}


def tiny_study_dir(tmp_root: Path) -> Path:
    """Run the study once (cached for the session) and return runs/tiny_report."""
    if "dir" not in _cache:
        import transferlab

        path = tmp_root / "tiny_report.yaml"
        path.write_text(yaml.safe_dump(STUDY))
        result = transferlab.run_study(path, runs_dir=tmp_root / "runs")
        assert sorted(result.finished) == sorted(RUNS[:-1]) and list(result.failed) == ["broken"], result
        _cache["dir"] = result.runs_dir
    return _cache["dir"]


def synthetic_class_image(cls: int, size: int = 16, scale: int = 1, seed: int = 0) -> np.ndarray:
    """A new image of class ``cls`` of the ``synthetic`` dataset (bright square at the class position,
    dark noise elsewhere), H×W×3 uint8, ``scale`` times larger — an image from outside the dataset."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    r, c = divmod(cls, 4)
    img[2 + 3 * r : 5 + 3 * r, 2 + 3 * c : 5 + 3 * c] = 230
    return np.kron(img, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else img
