"""Streaming row readers: a JSON array (Sky-T1's format) or JSONL (ShareGPT or OpenAI `messages` rows).

Both yield (row_index, row) with row_index counting records from 0. The JSON array reader parses one
element at a time with json.JSONDecoder.raw_decode over a sliding text buffer, so a 300 MB array costs
about one chunk plus one row of memory, never a copy of the file.
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Callable, Iterator

CHUNK_BYTES = 1 << 20
# A JSON string (possibly cut off by the buffer's end) or a bracket: enough to find where a value ends
# without building it, for rows the parser cannot build (nested past the recursion limit, huge ints).
_STRUCTURE = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]')
_SCALAR_END = re.compile(r"[,\]\s]")


def value_end(text: str, pos: int) -> int | None:
    """End of the JSON value starting at text[pos] (an array, object or string), or None when the text
    ends first. Assumes well-formed brackets, which is what the parser reported it could not build."""
    if text[pos] not in '[{"':  # a number or literal: it ends at the next separator
        m = _SCALAR_END.search(text, pos)
        return m.start() if m else None
    depth = 0
    for m in _STRUCTURE.finditer(text, pos):
        tok = m.group()
        if tok[0] == '"':
            if m.end() == len(text):
                return None  # the string may go on past the buffer
            if depth == 0:
                return m.end()
            continue
        depth += 1 if tok in "[{" else -1
        if depth == 0:
            return m.end()
    return None


def unparsable_reason(e: Exception) -> str:
    """Why json could not build a syntactically valid value."""
    if isinstance(e, RecursionError):
        return "nested too deeply to parse (past Python's recursion limit)"
    return f"cannot be parsed ({type(e).__name__}: {str(e)[:200]})"


class DataError(ValueError):
    """Bad input data; the message names the file and the row (and line where known)."""


def detect_format(path: str | Path) -> str:
    """ "array" when the first non-blank character is '[', "jsonl" when it is '{', "empty" for a blank file."""
    with open(path, "rb") as f:
        head = f.read(4096)
        while head and not head.lstrip(b"\xef\xbb\xbf \t\r\n"):
            more = f.read(4096)
            if not more:
                return "empty"
            head = more
    first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if first == b"[":
        return "array"
    if first == b"{":
        return "jsonl"
    if not first:
        return "empty"
    raise DataError(f"{path}: neither a JSON array nor JSONL (first character {first!r})")


class RowReader:
    """Iterate the rows of one file; `bytes_read` tells the progress printer how far it got.

    on_bad_row(row_index, message): called for a JSONL line that is not valid JSON or not UTF-8 when
    given (the row is skipped); without it such a line raises DataError. A syntax error inside a JSON
    array always raises: the parser cannot find the next element reliably after one.
    """

    def __init__(self, path: str | Path, on_bad_row: Callable[[int, str], None] | None = None,
                 chunk_bytes: int = CHUNK_BYTES):
        self.path = Path(path)
        self.on_bad_row = on_bad_row
        self.chunk_bytes = chunk_bytes
        self.bytes_read = 0
        self.format = detect_format(self.path)

    def __iter__(self) -> Iterator[tuple[int, object]]:
        if self.format == "array":
            return self._iter_array()
        if self.format == "jsonl":
            return self._iter_jsonl()
        return iter(())

    def _bad(self, row: int, msg: str) -> None:
        if self.on_bad_row is None:
            raise DataError(msg)
        self.on_bad_row(row, msg)

    def _iter_jsonl(self) -> Iterator[tuple[int, object]]:
        row = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                self.bytes_read += len(raw)
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                if not raw.strip():
                    continue
                where = f"{self.path}: row {row} (line {lineno})"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad(row, f"{where}: not valid UTF-8 at byte {e.start} of the line ({e.reason})")
                    row += 1
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    self._bad(row, f"{where}: invalid JSON: {e.msg} at column {e.colno}")
                    row += 1
                    continue
                except (RecursionError, ValueError, MemoryError) as e:  # valid JSON that cannot be built
                    self._bad(row, f"{where}: {unparsable_reason(e)}")
                    row += 1
                    continue
                yield row, obj
                row += 1

    def _iter_array(self) -> Iterator[tuple[int, object]]:
        decoder = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8-sig")("strict")
        buf, pos = "", 0          # text not yet parsed is buf[pos:]
        lines_before = 0          # newlines in text already dropped from buf, for error positions
        eof = False
        f = open(self.path, "rb")

        def fill(min_bytes: int) -> None:
            nonlocal buf, pos, lines_before, eof
            data = f.read(min_bytes)
            try:
                text = utf8.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise DataError(f"{self.path}: not valid UTF-8 near byte {self.bytes_read + e.start} "
                                f"({e.reason})") from None
            self.bytes_read += len(data)
            eof = not data
            if pos:  # drop parsed text so the buffer holds about one chunk plus the current row
                lines_before += buf.count("\n", 0, pos)
                buf = buf[pos:]
                pos = 0
            buf += text

        def where(row: int, at: int) -> str:
            line = lines_before + buf.count("\n", 0, at) + 1
            col = at - (buf.rfind("\n", 0, at) + 1) + 1
            return f"{self.path}: row {row} (line {line} column {col})"

        def skip_ws() -> str:
            """Next non-blank character ('' at end of file), consuming the blanks."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if eof:
                    return ""
                fill(self.chunk_bytes)

        try:
            fill(self.chunk_bytes)
            if skip_ws() != "[":
                raise DataError(f"{self.path}: expected a JSON array")
            pos += 1
            row = 0
            if skip_ws() == "]":
                pos += 1
            else:
                while True:
                    want = self.chunk_bytes
                    unbuildable = None
                    while True:
                        try:
                            obj, end = decoder.raw_decode(buf, pos)
                            if end < len(buf) or eof:
                                break  # a value that touches the buffer end might continue (a number)
                        except json.JSONDecodeError as e:
                            truncated = e.pos >= len(buf) - 8 or e.msg.startswith("Unterminated string")
                            if eof or not truncated:
                                raise DataError(f"{where(row, e.pos)}: invalid JSON: {e.msg}") from None
                        except (RecursionError, ValueError, MemoryError) as e:
                            # Well-formed but not buildable: find its end without building it, so the
                            # rows after it can still be read.
                            end = value_end(buf, pos)
                            if end is not None or eof:
                                if end is None:
                                    raise DataError(f"{where(row, pos)}: {unparsable_reason(e)}, and the file "
                                                    "ends inside it") from None
                                unbuildable = f"{where(row, pos)}: {unparsable_reason(e)}"
                                break
                        fill(want)
                        want *= 2  # a long row: grow reads so re-parsing its start stays linear overall
                    if unbuildable is not None:
                        self._bad(row, unbuildable)
                    else:
                        yield row, obj
                    row += 1
                    pos = end
                    c = skip_ws()
                    if c == ",":
                        pos += 1
                        if skip_ws() == "]":
                            raise DataError(f"{where(row, pos)}: trailing comma before ']'")
                        continue
                    if c == "]":
                        pos += 1
                        break
                    raise DataError(f"{where(row, pos)}: expected ',' or ']' after row {row - 1}, "
                                    + (f"found {c!r}" if c else "found end of file"))
            if skip_ws() != "":
                raise DataError(f"{where(row, pos)}: unexpected text after the JSON array")
        finally:
            f.close()


def iter_rows(path: str | Path, on_bad_row: Callable[[int, str], None] | None = None) -> Iterator[tuple[int, object]]:
    return iter(RowReader(path, on_bad_row))
