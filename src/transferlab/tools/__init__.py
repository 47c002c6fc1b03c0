"""Tools on runs and backbones: ``rank`` (transferability scores), ``summary`` (per-stage shapes, parameters,
FLOPs), ``activations`` (feature maps, Grad-CAM), ``predict`` (a run's model on any image files)."""

from transferlab.tools import inspect  # noqa: F401 - registers the predict: / activations: sections (kinds.base.RUN_SECTIONS)
