"""Image lists (``dataset: folder`` with ``data.root`` a file): each image's file, label(s) and split, one a row.

Forms; paths are relative to the list's folder; ``split`` is optional (``train``, ``val`` / ``valid`` /
``validation``, ``test``; empty or missing: ``train``)::

    labels.csv     path,label[,split]              one label per image (data.task: multiclass)
    labels.csv     path,labels[,split]             data.task: multilabel; labels separated by data.label_sep
                                                   (``cat;dog``; an empty cell: the image has no label)
    labels.csv     path,<class>,<class>,...[,split]   data.task: multilabel; one 0/1 column per class
    labels.jsonl   {"path": "a.png", "labels": ["cat", "dog"], "split": "test"}    one JSON object a line
                   (.ndjson too; multiclass: "label": "cat"; "labels" may also be one string split by label_sep)

The classes of a multi-label list, and their order: the 0/1 columns; else a ``classes.txt`` beside the list (one class a
line), when there is one — a label it does not name is an ``unknown_label`` error (a typo would otherwise
become a class of its own); else every label the list uses, sorted. A class may be missing from val or
test (``transferlab check-data`` says so); a multiclass list needs the same classes in every split.

A multi-label list (a ``labels`` column or key, 0/1 class columns) read with ``data.task: multiclass`` is an
error naming ``data.task``; a ``path,label`` list read with ``data.task: multilabel`` is read as a multi-label
list whose ``label`` column is split by ``data.label_sep``. Every problem of a row names the file and line.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from pathlib import Path
from typing import Any

from transferlab.data.images import Problem
from transferlab.data.scan import SPLIT_FOLDERS, FolderScan, Label, check_class_sets, nfc, sort_classes
from transferlab.data.sources import DatasetError

__all__ = ["CLASS_LIST_FILE", "JSONL_SUFFIXES", "detect_task", "is_list_file", "scan_list"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CLASS_LIST_FILE = "classes.txt"
"""The class list of a multi-label CSV / JSON-lines list, beside it: one class name a line, in class order."""

Row = tuple[int, str, list[str], str]  # (line number, file, label names, split)


def is_list_file(path: Path) -> bool:
    """``path`` is a CSV or JSON-lines image list."""
    return path.is_file() and path.suffix.lower() in (".csv", *JSONL_SUFFIXES)


def scan_list(path: Path, task: str = "multiclass", sep: str = ";") -> FolderScan:
    """Read an image list (module docstring) as ``task`` says; structural errors raise, row problems are collected."""
    problems: list[Problem] = []
    multilabel = task == "multilabel"
    try:
        if path.suffix.lower() in JSONL_SUFFIXES:
            rows, classes = _jsonl_rows(path, multilabel, sep, problems), None
        else:
            rows, classes = _csv_rows(path, multilabel, sep, problems)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a valid CSV file ({e})") from None
    kept = _unique_existing_rows(path, rows, sep, problems)
    if multilabel:
        return _multilabel_scan(path, kept, classes or _class_list_file(path), problems)
    return _multiclass_scan(path, kept, problems)


def detect_task(path: str | Path) -> str:
    """The task an image list is written for (``multilabel``: a ``labels`` column or key, or 0/1 class columns), else
    ``multiclass``; what ``transferlab check-data`` reads a bare list as."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            if path.suffix.lower() in JSONL_SUFFIXES:
                first = next((line for line in f if line.strip()), "{}")
                return "multilabel" if "labels" in json.loads(first) else "multiclass"
            header = [h.strip().lower() for h in next(csv.reader(f), [])]
    except (OSError, ValueError, csv.Error, TypeError):
        return "multiclass"  # unreadable: the scan says why
    others = [h for h in header if h not in ("path", "split")]
    return "multilabel" if "labels" in header or ("label" not in header and others) else "multiclass"


# --------------------------------------------------------------------------------------------
# reading the rows


def _csv_form(path: Path, header: list[str], multilabel: bool) -> str:
    """Which CSV form the header is: ``label``, ``labels`` or ``columns`` (0/1 per class); a wrong header raises."""
    others = [h for h in header if h not in ("path", "split")]
    if not multilabel:
        if "path" in header and "labels" in header and "label" not in header:
            raise DatasetError(f"{path}: a multi-label list (a 'labels' column): set data.task: multilabel (data.task is multiclass)")
        if "path" not in header or "label" not in header:
            flags = " (a header of 'path' and one 0/1 column per class is a multi-label list: set data.task: multilabel)" if (
                "path" in header and others) else ""
            raise DatasetError(
                f"{path}: the first line must be a header with columns 'path' and 'label' (and optionally 'split'); found {header}{flags}"
            )
        return "label"
    if "path" in header and ("labels" in header or "label" in header):
        return "labels" if "labels" in header else "label"
    if "path" in header and others:
        return "columns"
    raise DatasetError(f"{path}: the first line must be a header with columns 'path' and 'labels' (labels separated by "
                       f"data.label_sep), or 'path' and one 0/1 column per class (and optionally 'split'); found {header}")


def _csv_rows(path: Path, multilabel: bool, sep: str, problems: list[Problem]) -> tuple[list[Row], list[str] | None]:
    """The rows of a CSV list and, for the 0/1-column form, its classes (the column names, in order)."""
    rows: list[Row] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        names = [h.strip() for h in next(reader, [])]
        header = [h.lower() for h in names]
        form = _csv_form(path, header, multilabel)
        ip, isp = header.index("path"), header.index("split") if "split" in header else None
        il = header.index(form) if form != "columns" else -1
        flag_cols = [i for i, h in enumerate(header) if h not in ("path", "split")] if form == "columns" else []
        classes = [nfc(names[i]) for i in flag_cols] if form == "columns" else None
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}:{line_no}"
            if len(row) != len(header):
                problems.append(Problem(where, f"expected {len(header)} columns, found {len(row)}", "annotation"))
                continue
            if form == "columns":
                labels = _flag_labels(row, flag_cols, names, where, problems)
                if labels is None:
                    continue
            elif multilabel:
                labels = [nfc(x.strip()) for x in row[il].split(sep) if x.strip()]
            else:
                labels = [nfc(row[il].strip())]
            split = row[isp].strip().lower() if isp is not None else "train"
            _add_row(rows, problems, path, line_no, row[ip].strip(), labels, split, multilabel)
    return rows, classes


def _flag_labels(row: list[str], cols: list[int], names: list[str], where: str, problems: list[Problem]) -> list[str] | None:
    """The classes whose 0/1 column says 1 (``None``, and a problem naming the column, for any other value)."""
    bad = [(names[i], row[i].strip()) for i in cols if row[i].strip() not in ("0", "1")]
    if bad:
        problems.append(Problem(where, "; ".join(f"column {n!r}: {v!r} is not 0 or 1" for n, v in bad), "annotation"))
        return None
    return [nfc(names[i]) for i in cols if row[i].strip() == "1"]


def _jsonl_rows(path: Path, multilabel: bool, sep: str, problems: list[Problem]) -> list[Row]:
    """The rows of a JSON-lines list: one object a line with ``path``, ``labels`` (or ``label``) and maybe ``split``."""
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(Problem(where, f"not valid JSON ({e.msg}, column {e.colno})", "annotation"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(where, f"expected a JSON object with keys 'path' and 'labels', found {type(obj).__name__}", "annotation"))
                continue
            if not multilabel and "labels" in obj:
                raise DatasetError(f"{where}: key 'labels': a multi-label list: set data.task: multilabel (data.task is multiclass)")
            labels = _json_labels(obj, multilabel, sep, where, problems)
            file, split = obj.get("path"), obj.get("split", "train")
            if not isinstance(file, str) or not isinstance(split, str) or labels is None:
                bad = [f"key {k!r} must be a string, found {v!r}" for k, v in (("path", file), ("split", split)) if not isinstance(v, str)]
                if bad:
                    problems.append(Problem(where, "; ".join(bad), "annotation"))
                continue
            _add_row(rows, problems, path, line_no, file.strip(), labels, split.strip().lower(), multilabel)
    return rows


def _is_name(value: object) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _json_labels(obj: dict[str, Any], multilabel: bool, sep: str, where: str, problems: list[Problem]) -> list[str] | None:
    """The label names of one JSON object (``None``, and a problem naming the key, when they are malformed)."""
    if not multilabel:
        value = obj.get("label")
        if not _is_name(value):
            problems.append(Problem(where, f"key 'label' must be a class name, found {value!r}", "annotation"))
            return None
        return [nfc(str(value).strip())]
    key = "label" if "label" in obj and "labels" not in obj else "labels"
    value = obj.get(key)
    if isinstance(value, str):
        value = value.split(sep)
    if not isinstance(value, list) or not all(_is_name(v) for v in value):
        problems.append(Problem(where, f"key {key!r} must be a list of class names, found {value!r}", "annotation"))
        return None
    return [nfc(str(v).strip()) for v in value if str(v).strip()]


def _add_row(rows: list[Row], problems: list[Problem], path: Path, line_no: int, file: str, labels: list[str], split: str,
             multilabel: bool) -> None:
    """Append one row, or a problem naming its line: an empty path (or label, multiclass), an unknown split."""
    where = f"{path}:{line_no}"
    if not file or (not multilabel and not labels[0]):
        problems.append(Problem(where, "empty path or label" if not multilabel else "empty path", "annotation"))
    elif (split or "train") not in SPLIT_FOLDERS:
        problems.append(Problem(where, f"unknown split {split!r} (use train, val or test)", "annotation"))
    else:
        rows.append((line_no, str(path.parent / file), list(dict.fromkeys(labels)), SPLIT_FOLDERS[split or "train"]))


def _class_list_file(path: Path) -> list[str] | None:
    """The classes of ``classes.txt`` beside the list (``None``: there is none); a class listed twice raises."""
    file = path.parent / CLASS_LIST_FILE
    if not file.is_file():
        return None
    names: list[str] = []
    for line_no, line in enumerate(file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        name = nfc(line.strip())
        if name in names:
            raise DatasetError(f"{file}:{line_no}: class {name!r} is listed twice")
        if name:
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# from rows to a scan


def _unique_existing_rows(path: Path, rows: list[Row], sep: str, problems: list[Problem]) -> list[Row]:
    """The rows whose file exists, each file once (listed again: a warning, or an error with other labels or split)."""
    seen: dict[str, tuple[int, str, str]] = {}
    kept = []
    for line_no, file, labels, split in rows:
        label = sep.join(sorted(labels))  # a multi-label image's labels in any order are the same labels
        if file in seen:
            first_line, first_label, first_split = seen[file]
            conflict = (first_label, first_split) != (label, split)
            problems.append(
                Problem(
                    f"{path}:{line_no}",
                    f"{file} is listed again (first on line {first_line})"
                    + (f" with another label or split ({first_label}/{first_split} vs {label}/{split})" if conflict else ""),
                    "duplicate",
                    "error" if conflict else "warning",
                )
            )
            continue
        seen[file] = (line_no, label, split)
        if not os.path.isfile(file):
            problems.append(Problem(file, f"file not found (listed in {path} line {line_no})", "bad_image"))
            continue
        kept.append((line_no, file, labels, split))
    if not kept:
        problems.append(Problem(str(path), "lists no usable images", "no_classes"))
    return kept


def _scan_of(path: Path, names: list[str], kept: list[tuple[str, Label, str]], problems: list[Problem], multilabel: bool) -> FolderScan:
    """The scan of the rows kept: (file, label, split) each."""
    splits: dict[str, tuple[list[str], list[Label]]] = {}
    for file, label, split in kept:
        files, labels = splits.setdefault(split, ([], []))
        files.append(file)
        labels.append(label)
    if "train" not in splits and kept:
        problems.append(Problem(str(path), "has no training images (split column never says 'train')", "no_classes"))
    layout = "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "csv"
    return FolderScan(path, layout, names, splits, problems, multilabel=multilabel)


def _multiclass_scan(path: Path, rows: list[Row], problems: list[Problem]) -> FolderScan:
    """One label per image; every split has the classes of train."""
    per_split: dict[str, set[str]] = {}
    for _, _, labels, split in rows:
        per_split.setdefault(split, set()).add(labels[0])
    check_class_sets(per_split, {s: f"{path} (split {s})" for s in per_split}, problems)
    names = sort_classes(per_split.get("train", set()) or set().union(*per_split.values()) if per_split else set())
    index = {n: i for i, n in enumerate(names)}
    kept: list[tuple[str, Label, str]] = [(file, index[labels[0]], split) for _, file, labels, split in rows if labels[0] in index]
    return _scan_of(path, names, kept, problems, multilabel=False)


def _multilabel_scan(path: Path, rows: list[Row], given: list[str] | None, problems: list[Problem]) -> FolderScan:
    """Any number of labels per image; with a class list (0/1 columns, ``classes.txt``) a label outside it is an error."""
    names = given if given is not None else sort_classes({label for _, _, labels, _ in rows for label in labels})
    index = {n: i for i, n in enumerate(names)}
    kept: list[tuple[str, Label, str]] = []
    for line_no, file, labels, split in rows:
        unknown = [label for label in labels if label not in index]
        for label in unknown:
            close = difflib.get_close_matches(label, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(Problem(f"{path}:{line_no}", f"unknown label {label!r}{hint}: not in {path.parent / CLASS_LIST_FILE}",
                                    "unknown_label"))
        if not unknown:
            kept.append((file, tuple(sorted(index[label] for label in labels)), split))
    return _scan_of(path, names, kept, problems, multilabel=True)
