"""Reading text datasets: .txt (one sample per line, or blank-line separated paragraphs),
.jsonl, .csv and .parquet, streamed row by row so a large file never sits in memory."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mistudio.errors import InvalidInput
from mistudio.text import storable

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
# The csv module refuses fields over 128 KiB by default; a long document is one field.
csv.field_size_limit(2**31 - 1)


def check_file(path: Path, text_column: str) -> None:
    """Refuse an empty, binary or unreadable file, or one without the text column."""
    if path.suffix.lower() not in FORMATS:
        raise InvalidInput("file", f"{path.name}: use one of {', '.join(FORMATS)}.")
    if path.stat().st_size == 0:
        raise InvalidInput("file", f"{path.name} is empty.")
    if path.suffix.lower() != ".parquet":
        head = path.open("rb").read(8192)
        if b"\x00" in head:
            raise InvalidInput("file", f"{path.name} looks binary (it contains NUL bytes), not text.")
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # a multi-byte character cut at the 8 KiB boundary is fine
                raise InvalidInput("file", f"{path.name} is not UTF-8 text.") from None
    first = next(iter_texts(path, text_column), None)
    if first is None:
        raise InvalidInput("file", f"{path.name} has no non-empty text rows.")


def iter_texts(path: Path, text_column: str = "text") -> Iterator[str]:
    """Rows of one file, or of every data file in a folder (a Hub split's shards) in order.
    A file that turns out not to be text (bad UTF-8, NUL, a broken parquet file) anywhere,
    not only in the part `check_file` looked at, is refused with the reason."""
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS and ".cache" not in p.parts):
            yield from iter_texts(child, text_column)
        return
    yield from iter_file_texts(lambda: path.open("rb"), path, text_column)


def iter_file_texts(open_binary, path: Path, text_column: str = "text", scan_bytes: int | None = None) -> Iterator[str]:
    """The rows of one data file however it is opened: `open_binary()` gives a binary file
    object (a local file, or a Hub file read over HTTP Range through HfFileSystem); `path`
    names it (its suffix says the format). `scan_bytes` bounds how much of a .txt is looked
    at to tell paragraphs from lines (None: all of it)."""
    try:
        for number, text in enumerate(_rows(open_binary, path, text_column, scan_bytes), 1):
            if not storable(text):
                raise InvalidInput("file", f"{path.name} row {number} contains a NUL character or an unpaired surrogate.")
            yield text
    except UnicodeDecodeError as exc:
        raise InvalidInput("file", f"{path.name} is not UTF-8 text (byte {exc.start:,} of a line cannot be decoded).") from None
    except ValueError as exc:  # pyarrow's ArrowInvalid, and the like, for a file that is not parquet
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput("file", f"{path.name} cannot be read as {path.suffix.lower()}: {type(exc).__name__}.") from None


def _text(open_binary, newline=None):
    return io.TextIOWrapper(open_binary(), encoding="utf-8", newline=newline)


def _rows(open_binary, path: Path, text_column: str, scan_bytes: int | None) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _txt(open_binary, scan_bytes)
    elif suffix == ".jsonl":
        with _text(open_binary) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as exc:  # not JSON, an integer too long to parse, nested too deep
                    why = " (nested too deep)" if isinstance(exc, RecursionError) else ""
                    raise InvalidInput("file", f"{path.name} line {number} is not JSON{why}.") from None
                text = _column(row, text_column, path, number)
                if text.strip():
                    yield text
    elif suffix == ".csv":
        with _text(open_binary, newline="") as handle:
            reader = csv.DictReader(handle)
            try:
                if text_column not in (reader.fieldnames or []):
                    raise InvalidInput("text_column", f"{path.name} has no column {text_column!r} (columns: {reader.fieldnames}).")
                for row in reader:
                    if (row[text_column] or "").strip():
                        yield row[text_column]
            except csv.Error as exc:
                raise InvalidInput("file", f"{path.name} line {reader.line_num} is not valid CSV: {exc}.") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        with open_binary() as raw, _damaged_parquet(path):
            parquet = pq.ParquetFile(raw)
            check_parquet_text_column(parquet.schema_arrow, path.name, text_column)
            # Row group by row group: a reader that stops early has read only the groups it used
            # (iter_batches reads ahead across several groups).
            for group in range(parquet.num_row_groups):
                for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=[text_column]):
                    for value in batch.column(0).to_pylist():
                        if value and value.strip():
                            yield value
    else:
        raise InvalidInput("file", f"{path.name}: use one of {', '.join(FORMATS)}.")


def check_parquet_text_column(schema, name: str, text_column: str) -> None:
    """A parquet file (by its schema: the footer alone) has the text column, holding text."""
    import pyarrow as pa

    if text_column not in schema.names:
        raise InvalidInput("text_column", f"{name} has no column {text_column!r} (columns: {schema.names}).")
    column_type = schema.field(text_column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise InvalidInput("text_column", f"{name}: column {text_column!r} holds {column_type}, not text.")


@contextmanager
def _damaged_parquet(path: Path) -> Iterator[None]:
    """pyarrow reports a damaged footer or page as a plain OSError ("Couldn't deserialize
    thrift"); a refusal that says so. Its subclasses (a network error while a Hub file is
    streamed) are not the file's fault and pass through."""
    try:
        yield
    except OSError as exc:
        if type(exc) is not OSError:
            raise
        raise InvalidInput("file", f"{path.name} cannot be read as .parquet: its metadata or data is damaged.") from None


def _txt(open_binary, scan_bytes: int | None = None) -> Iterator[str]:
    """Blank-line separated paragraphs when the file has blank lines, else one per line.
    Two streamed passes (the first only looks for a blank line, in the first `scan_bytes`
    when given), never the whole file in memory."""
    with _text(open_binary) as handle:
        seen = 0
        paragraphs = False
        for number, line in enumerate(handle):
            if number > 0 and line == "\n":
                paragraphs = True
                break
            seen += len(line)
            if scan_bytes is not None and seen >= scan_bytes:
                break
    with _text(open_binary) as handle:
        if not paragraphs:
            for line in handle:
                if line.strip():
                    yield line.strip()
            return
        lines: list[str] = []
        for line in handle:
            if line == "\n":
                if "".join(lines).strip():
                    yield "".join(lines).strip()
                lines = []
            else:
                lines.append(line)
        if "".join(lines).strip():
            yield "".join(lines).strip()


def _column(row, column: str, path: Path, number: int) -> str:
    """The row's text; a missing (null) value is an empty row, skipped like in the other formats."""
    if not isinstance(row, dict):
        raise InvalidInput("text_column", f"{path.name} line {number} is a JSON {type(row).__name__}, not an object with a {column!r} field.")
    if column not in row:
        fields = ", ".join(repr(str(name)[:40]) for name in list(row)[:20]) or "none"
        raise InvalidInput("text_column", f"{path.name} line {number} has no {column!r} field (its fields: {fields}).")
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput("text_column", f"{path.name} line {number}: {column!r} is {type(value).__name__}, not text.")
    return value


PREVIEW_CHARS = 300  # a preview row's length; a longer row ends in "…" there


def preview_text(text: str) -> str:
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1].rstrip() + "…"


def summarize(path: Path, text_column: str, preview_rows: int = 5) -> tuple[int, list[str], dict]:
    """In one read: the row count, the first rows (each cut at PREVIEW_CHARS, marked "…")
    for the Datasets view, and characters per row over every row (`length_summary`)."""
    from array import array

    count, preview, chars = 0, [], array("q")
    for text in iter_texts(path, text_column):
        if len(preview) < preview_rows:
            preview.append(preview_text(text))
        chars.append(len(text))
        count += 1
    return count, preview, length_summary(chars)


HISTOGRAM_BINS = 24


def length_summary(lengths) -> dict | None:
    """min, median, p95, max and mean of per-row lengths, and a histogram (HISTOGRAM_BINS
    bins, log-spaced when the lengths span more than a factor of 20, so the long tail shows);
    None for no rows."""
    import numpy as np

    values = np.asarray(lengths, dtype=np.float64)
    if values.size == 0:
        return None
    low, high = float(values.min()), float(values.max())
    log = low >= 1 and high / max(low, 1) > 20
    if log:
        edges = np.geomspace(low, high, HISTOGRAM_BINS + 1)
    elif high - low + 1 <= HISTOGRAM_BINS:  # few distinct lengths: one bin each
        edges = np.arange(low, high + 2)
    else:
        edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
    counts, edges = np.histogram(values, bins=edges)
    return {
        "rows": int(values.size), "min": int(low), "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)), "max": int(high), "mean": float(values.mean()),
        "histogram": {"edges": [round(float(e), 1) for e in edges], "counts": counts.astype(int).tolist(), "log": bool(log)},
    }  # fmt: skip


def text_statistics(texts, tokenizer=None, max_rows: int | None = None, batch: int = 256, on_rows=None) -> dict:
    """Characters (and, with `tokenizer`, tokens without special tokens) per row over
    `texts`, or over their first `max_rows`: {"rows", "complete" (every row was read),
    "chars", "tokens"} with `length_summary`s. `on_rows(n)` after each batch (it may raise
    to stop)."""
    from array import array

    chars, tokens, pending, complete = array("q"), array("q"), [], True

    def flush() -> None:
        if tokenizer is not None and pending:
            tokens.extend(len(ids) for ids in tokenizer(pending, add_special_tokens=False)["input_ids"])
        pending.clear()
        if on_rows is not None:
            on_rows(len(chars))

    for text in texts:
        if max_rows is not None and len(chars) >= max_rows:
            complete = False
            break
        chars.append(len(text))
        pending.append(text)
        if len(pending) >= batch:
            flush()
    flush()
    return {"rows": len(chars), "complete": complete, "chars": length_summary(chars),
            "tokens": length_summary(tokens) if tokenizer is not None else None}  # fmt: skip