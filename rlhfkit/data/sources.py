"""Read raw rows from files, saved datasets and the Hugging Face hub.

`load_rows` is the single entry point. It returns plain dicts, one per example,
each with a `_source` key saying where it came from, so that every later error
can point at a file and a line:

    data/train.jsonl:line 12      JSON Lines (file line, 1-based, blank lines count)
    data/train.json:item 4        JSON list (1-based position in the list)
    data/train.csv:row 3          CSV (1-based data row, header excluded; a quoted
                                  cell may span lines, so rows, not lines, are counted)
    data/train.parquet:row 5      Parquet (1-based)
    saved_dir[train]:row 5        `DatasetDict.save_to_disk` directory, split train
    saved_dir:row 5               `Dataset.save_to_disk` directory
    owner/name[train]:row 5       hub dataset

This module only reads and renames columns; checking that the columns make a
valid example is `rlhfkit.data.formats`' job. It never imports models or torch;
`datasets` and `pyarrow` are imported only when a spec needs them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re

from rlhfkit.errors import DataError

_SUPPORTED_FILES = ".json, .jsonl, .csv, .parquet"
_JSON_EXTS = (".json",)
_JSONL_EXTS = (".jsonl", ".ndjson")
_CSV_EXTS = (".csv",)
_PARQUET_EXTS = (".parquet",)
_KNOWN_EXTS = _JSON_EXTS + _JSONL_EXTS + _CSV_EXTS + _PARQUET_EXTS
_DEFAULT_SPLIT = "train"


def load_rows(spec: str | list[str], column_map: dict[str, str] | None = None) -> list[dict]:
    """Load the rows of one source, or of several sources concatenated in order.

    `spec` is a file path (.json list of objects or JSON Lines, .jsonl, .csv,
    .parquet), a directory written by `Dataset.save_to_disk` /
    `DatasetDict.save_to_disk` (optionally `dir:split`, default split `train`), or
    a hub dataset id `owner/name` / `owner/name:split` (default split `train`).
    A list of specs is concatenated in order, which is how datasets are mixed.

    `column_map` maps `{their_name: our_name}` and renames columns on every row
    that has them. Each mapped column must appear in at least one row of the
    (combined) data, and renaming onto a column that the row already has is an
    error. Missing cells (CSV empty cells, parquet nulls, NaN) come back as None.

    Returns new plain dicts, each with a `_source` location string (see the
    module docstring); a `_source` column in the data itself is overwritten.
    """
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise DataError("no data sources given (an empty list)")
    rows: list[dict] = []
    for one in specs:
        if not isinstance(one, str):
            raise DataError(f"a data source must be a path or dataset id string, got {type(one).__name__}")
        rows.extend(_load_one(one))
    if column_map:
        rows = rename_columns(rows, column_map, specs)
    return rows


def rename_columns(rows: list[dict], column_map: dict[str, str], specs: list[str]) -> list[dict]:
    """Return new rows with columns renamed by `column_map` (`{their_name: our_name}`).

    `specs` only serves error messages. Raises DataError if a mapped column is in
    no row at all (listing the columns that do exist), or if a rename would
    overwrite a column the row already has (renames are simultaneous, so swapping
    two columns is fine).
    """
    where = ", ".join(specs)
    present: set[str] = set()
    for row in rows:
        present.update(row)
    for theirs, ours in column_map.items():
        if not isinstance(theirs, str) or not isinstance(ours, str) or not ours:
            raise DataError(f"column_map entries must map a column name to a new name, got {theirs!r}: {ours!r}")
        if theirs not in present:
            existing = ", ".join(sorted(c for c in present if c != "_source"))
            raise DataError(
                f"column_map renames '{theirs}' to '{ours}', but no row of {where} has a column "
                f"'{theirs}'; the columns are: {existing}"
            )
    renamed = []
    for row in rows:
        out: dict = {}
        for key, value in row.items():
            new_key = column_map.get(key, key)
            if new_key in out:
                raise DataError(
                    f"column_map renames a column onto '{new_key}', which this row already has",
                    source=row.get("_source"),
                    field=new_key,
                )
            out[new_key] = value
        renamed.append(out)
    return renamed


# --------------------------------------------------------------------------- dispatch


def _load_one(spec: str) -> list[dict]:
    """Rows of a single spec: an existing path, `dir:split`, or a hub id."""
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        if os.path.isdir(path):
            return _load_saved_dataset(path, split=None, label=spec)
        return _load_file(path, label=spec)
    base, split = _split_suffix(spec)
    if split is not None and os.path.exists(os.path.expanduser(base)):
        if os.path.isdir(os.path.expanduser(base)):
            return _load_saved_dataset(os.path.expanduser(base), split=split, label=base)
        raise DataError(
            f"':{split}' selects a split, which only datasets saved with save_to_disk and hub datasets "
            f"have; '{base}' is a file",
            source=spec,
        )
    if _looks_local(spec) or _looks_local(base):
        raise DataError(f"file does not exist (looked for {os.path.abspath(base)})", source=spec)
    return _load_hub(base, split or _DEFAULT_SPLIT)


def _split_suffix(spec: str) -> tuple[str, str | None]:
    """`'owner/name:test'` -> `('owner/name', 'test')`; no colon -> `(spec, None)`."""
    if ":" in spec:
        base, split = spec.rsplit(":", 1)
        if base and split and "/" not in split and "\\" not in split:
            return base, split
    return spec, None


def _looks_local(spec: str) -> bool:
    """True for specs that can only mean a local file: a known extension or a ./ / ~ prefix."""
    return spec.lower().endswith(_KNOWN_EXTS) or spec.startswith(("./", "../", "/", "~", ".\\"))


def _load_file(path: str, label: str) -> list[dict]:
    """Rows of one file; `label` (the path as the user wrote it) prefixes every `_source`."""
    ext = os.path.splitext(path)[1].lower()
    if ext in _JSON_EXTS:
        rows = _read_json(_read_text(path, label), label)
    elif ext in _JSONL_EXTS:
        rows = _read_jsonl(_read_text(path, label), label)
    elif ext in _CSV_EXTS:
        rows = _read_csv(_read_text(path, label), label)
    elif ext in _PARQUET_EXTS:
        rows = _read_parquet(path, label)
    else:
        raise DataError(f"unsupported file type '{ext or '(none)'}'; expected one of {_SUPPORTED_FILES}", source=label)
    if not rows:
        raise DataError("no rows (the file is empty)", source=label)
    return rows


# --------------------------------------------------------------------------- files


def _read_text(path: str, label: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e})", source=label) from e


def _read_json(text: str, path: str) -> list[dict]:
    """A JSON list of objects; a file of one object per line is read as JSON Lines."""
    stripped = text.lstrip()
    if not stripped:
        return []
    if stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=f"{path}:line {e.lineno}") from e
        rows = []
        for i, item in enumerate(data, start=1):
            source = f"{path}:item {i}"
            if not isinstance(item, dict):
                raise DataError(f"expected a JSON object, got {_json_type(item)}", source=source)
            rows.append(_with_source(item, source))
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(text, path)  # one object per line: really JSON Lines
    if isinstance(data, dict):
        first_line = text[: len(text) - len(stripped)].count("\n") + 1
        return [_with_source(data, f"{path}:line {first_line}")]
    raise DataError(f"expected a JSON list of objects (or one object per line), got {_json_type(data)}", source=path)


def jsonl_lines(text: str, keepends: bool = False) -> list[str]:
    """The lines of a JSON Lines text, split at \\n, \\r\\n or \\r only: JSON strings may hold U+2028,
    U+0085 and other characters that `str.splitlines` would also split at. KEEPENDS: each line with
    its line break (no empty last line), as `splitlines(keepends=True)`."""
    if keepends:
        return io.StringIO(text, newline="").readlines()
    return re.split(r"\r\n|\r|\n", text)


def jsonl_records(path) -> list:
    """The JSON values of a JSON Lines file rlhfkit wrote (metrics, samples): every non-blank line,
    split by `jsonl_lines`. Data files a user gives go through `load_rows` (file and line on errors)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in jsonl_lines(f.read()) if line.strip()]


def _read_jsonl(text: str, path: str) -> list[dict]:
    """One JSON object per line; blank lines are skipped but still counted."""
    rows = []
    for lineno, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        source = f"{path}:line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", source=source) from e
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object, got {_json_type(item)}", source=source)
        rows.append(_with_source(item, source))
    return rows


def _read_csv(text: str, path: str) -> list[dict]:
    """CSV with a header row. Every cell is a string; an empty cell becomes None."""
    reader = csv.reader(io.StringIO(text, newline=""))  # records end at \n, \r\n or \r only, not at U+2028
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        rows = []
        row_number = 0
        for cells in reader:
            if not cells:  # blank line
                continue
            row_number += 1
            source = f"{path}:row {row_number}"
            if len(cells) > len(header):
                raise DataError(f"row has {len(cells)} cells but the header has {len(header)} columns", source=source)
            cells = cells + [""] * (len(header) - len(cells))
            rows.append(_with_source({h: (c if c != "" else None) for h, c in zip(header, cells)}, source))
    except csv.Error as e:
        raise DataError(f"malformed CSV: {e}", source=f"{path}:line {reader.line_num}") from e
    return rows


def _read_parquet(path: str, label: str) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"could not read parquet: {e}", source=label) from e
    return [_with_source(r, f"{label}:row {i}") for i, r in enumerate(records, start=1)]


# --------------------------------------------------------------------------- datasets


def _load_saved_dataset(path: str, split: str | None, label: str) -> list[dict]:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(
            f"is a directory but not a dataset saved with save_to_disk ({e})", source=label
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        split = split or _DEFAULT_SPLIT
        if split not in loaded:
            raise DataError(f"has no split '{split}'; the splits are: {', '.join(loaded)}", source=label)
        return _dataset_rows(loaded[split], f"{label}[{split}]")
    if split is not None:
        raise DataError(f"':{split}' selects a split, but this saved Dataset has no splits", source=f"{label}:{split}")
    return _dataset_rows(loaded, label)


def _load_hub(dataset_id: str, split: str) -> list[dict]:
    """`datasets.load_dataset(dataset_id, split=split)`; needs the network or the HF cache."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # network, auth, missing split: all surface the same way
        raise DataError(
            f"could not load {dataset_id} (split '{split}') from the Hugging Face hub: "
            f"{type(e).__name__}: {e}; is it a local path that does not exist?",
            source=dataset_id,
        ) from e
    return _dataset_rows(ds, f"{dataset_id}[{split}]")


def _dataset_rows(ds, label: str) -> list[dict]:
    rows = [_with_source(r, f"{label}:row {i}") for i, r in enumerate(ds.to_list(), start=1)]
    if not rows:
        raise DataError("no rows (the dataset is empty)", source=label)
    return rows


# --------------------------------------------------------------------------- helpers


def _with_source(row: dict, source: str) -> dict:
    """A new row with NaN cells as None and `_source` set."""
    out = {str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    out["_source"] = source
    return out


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
