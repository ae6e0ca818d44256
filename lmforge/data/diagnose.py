"""Find the first bad record of a local corpus, to turn a `datasets` failure into one clear line.

`datasets` reports a bad file as "An error occurred while generating the dataset", without the
file or line. These readers go through the files in plain Python (slow, so only after a failure
or a failed check) and return a DataError that names the file, the line and what to do.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.errors import DataError

_JSON_TYPES = {
    dict: "an object",
    list: "a list",
    int: "a number",
    float: "a number",
    bool: "a bool",
}


def record_problem(record: Any, field: str, where: str) -> DataError | None:
    """What is wrong with a corpus record for `field` (not an object, no such field, null, not a
    string), as a DataError naming `where`; None when it is a usable text record."""
    if not isinstance(record, dict):
        return DataError(f"{where}: expected a JSON object, got {_JSON_TYPES.get(type(record))}")
    if field not in record:
        fields = ", ".join(record) or "none"
        return DataError(
            f"{where}: no text field '{field}' (its fields: {fields}); set data.text_field"
        )
    value = record[field]
    if value is None:
        return DataError(f"{where}: text field '{field}' is null; remove the record or fill it")
    if not isinstance(value, str):
        return DataError(
            f"{where}: text field '{field}' is {_JSON_TYPES.get(type(value), 'not text')}, "
            "not a string; store the text as a JSON string"
        )
    return None


def parse_json(text: str, where: str, what: str = "that line") -> Any:
    """json.loads(text), every failure a DataError naming `where` (file and line): invalid
    JSON, nesting too deep for the parser, a number past Python's digit limit."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        place = f" line {err.lineno}" if "\n" in text.strip() else ""  # a whole .json file
        raise DataError(
            f"{where}{place}: invalid JSON ({err.msg}, column {err.colno}); fix or remove {what}"
        ) from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; flatten {what}") from None
    except ValueError as err:  # an integer of thousands of digits
        detail = str(err).split(":")[0]
        raise DataError(f"{where}: a value cannot be read ({detail}); fix {what}") from None


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for each non-blank line; raises DataError on invalid JSON."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        yield f"{path} line {lineno}", parse_json(line, f"{path} line {lineno}")


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for a JSON Lines file, or a .json array of objects."""
    text = path.read_text("utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        records = parse_json(text, str(path), "the file")
        for i, record in enumerate(records):
            yield f"{path} record {i}", record
        return
    yield from _json_lines(path, text)


def _json_problem(path: Path, field: str) -> DataError | None:
    try:
        for where, record in _json_records(path):
            problem = record_problem(record, field, where)
            if problem is not None:
                return problem
    except DataError as err:
        return err
    return None


def _parquet_problem(path: Path, field: str) -> DataError | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return DataError(f"{path}: cannot read it as parquet ({detail}); re-export it")
    if pq.read_metadata(path).num_rows == 0:
        return DataError(f"{path}: the file has no rows; add documents or remove it")
    if field not in schema.names:
        fields = ", ".join(schema.names) or "none"
        return DataError(
            f"{path}: no text field '{field}' (its fields: {fields}); set data.text_field"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return DataError(
            f"{path}: text field '{field}' has type {kind}, not string; store the text as strings"
        )
    column = pq.read_table(path, columns=[field]).column(field)
    if column.null_count:
        row = column.is_null().to_numpy(zero_copy_only=False).argmax()
        return DataError(f"{path} row {row}: text field '{field}' is null; remove or fill it")
    return None


def find_problem(files: Sequence[Path], builder: str, field: str) -> DataError | None:
    """The first bad record of these files (or None if this reader finds none)."""
    for path in files:
        if builder == "json":
            problem = _json_problem(path, field)
        elif builder == "parquet":
            problem = _parquet_problem(path, field)
        else:
            problem = None  # a .txt file is one document; encoding was checked on hashing
        if problem is not None:
            return problem
    return None
