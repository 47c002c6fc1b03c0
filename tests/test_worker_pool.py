"""The ``local`` executor's slots: which GPU each worker sees."""

from __future__ import annotations

import pytest
import torch

from transferlab.config import ExecutorConfig
from transferlab.study.executors import LocalExecutor


@pytest.mark.parametrize("parent, count, workers, expected", [
    ("3", 1, 2, ["3", "3"]),                    # the parent's only card, not card 0
    ("1,3", 2, 3, ["1", "3", "1"]),             # round-robin over the parent's list
    ("GPU-aa,GPU-bb", 2, 2, ["GPU-aa", "GPU-bb"]),  # UUIDs kept as they are
    (None, 2, 3, ["0", "1", "0"]),              # no variable: torch's indices
])
def test_local_workers_get_cards_from_the_parents_visible_list(tmp_path, monkeypatch, parent, count, workers, expected):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if parent is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent)
    ex = LocalExecutor(ExecutorConfig(name="local", workers=workers), tmp_path)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in ex.slots] == expected


def test_local_workers_without_a_gpu_get_no_cuda_variable(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    ex = LocalExecutor(ExecutorConfig(name="local"), tmp_path)
    assert len(ex.slots) == 1 and ex.slots[0].env == {}
