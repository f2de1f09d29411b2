"""Worker logging: hostile text cannot split or forge lines, secrets are masked (real stdout)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from lightning_lora.worker.logs import configure_logging, escape_control

ROOT = Path(__file__).resolve().parents[2]
HF_TOKEN = "hf_SeCrEtHuGgInGfAcEtOkEn42"
# a secret holding a control character: escaping it before redaction would let it through
TAB_TOKEN = "internal\ttoken-value-9"
FORGED = "2030-01-01 00:00:00,000 ERROR lightning_lora.worker [MainThread] forged record"

SCRIPT = r"""
import logging, os, sys
from lightning_lora.worker.logs import configure_logging

configure_logging("debug", sys.argv[1])
configure_logging("info", sys.argv[1])  # a second call replaces the handler: no duplicate lines
log = logging.getLogger("lightning_lora.worker.app")
log.debug("not shown at INFO")
log.info("downloaded %s", "styles/7/images/a\u2028b\u2029c\x85d.png")
log.warning("backend said: %s", "ok\r\n" + os.environ["FORGED"])
log.error("colour %s", "\x1b[31mred\x1b[0m\x07\x00")
log.error("hf %s internal %s", os.environ["HF_TOKEN"], os.environ["INTERNAL_API_TOKEN"])
log.info("job started", extra={"job_id": "job-1", "style_id": 7, "note": os.environ["HF_TOKEN"]})
try:
    raise ValueError("bad \x1b[2J value " + os.environ["HF_TOKEN"])
except ValueError:
    log.exception("job failed")
"""

RECORDS = 6  # records logged above at INFO or higher


def run_logging(fmt: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYTHONIOENCODING": "utf-8",
        "HF_TOKEN": HF_TOKEN,
        "INTERNAL_API_TOKEN": TAB_TOKEN,
        "FORGED": FORGED,
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, fmt],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=True,
    )
    raw = done.stdout
    assert done.stderr == b""
    # nothing that a terminal or a log shipper could take for a line break or a control sequence
    for forbidden in (b"\r", b"\x1b", b"\x00", b"\x07", "\u2028".encode(), "\u2029".encode()):
        assert forbidden not in raw, forbidden
    assert "\x85".encode() not in raw
    return raw.decode("utf-8")


def test_text_lines_are_escaped_one_per_record_and_redacted() -> None:
    out = run_logging("text")
    lines = out.split("\n")
    assert lines[-1] == ""  # ends with a newline
    header = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING|ERROR) ")
    records = [line for line in lines if header.match(line)]
    assert len(records) == RECORDS, out
    assert not any(line.startswith(FORGED[:20]) for line in lines)
    assert "not shown" not in out

    assert records[0].endswith(
        "INFO lightning_lora.worker.app [MainThread] downloaded "
        "styles/7/images/a\\u2028b\\u2029c\\x85d.png"
    )
    assert records[1].endswith(f"backend said: ok\\r\\n{FORGED}")
    assert records[2].endswith("colour \\x1b[31mred\\x1b[0m\\x07\\x00")
    assert records[3].endswith("hf *** internal ***")
    assert records[4].endswith("job started")
    assert records[5].endswith("ERROR lightning_lora.worker.app [MainThread] job failed")

    # the traceback keeps its own lines, with its control characters escaped and secrets masked
    traceback = lines[lines.index(records[5]) + 1 : -1]
    assert traceback[0] == "Traceback (most recent call last):"
    assert traceback[-1] == "ValueError: bad \\x1b[2J value ***"
    assert HF_TOKEN not in out and TAB_TOKEN not in out
    assert "internal\\ttoken" not in out  # the tab-holding secret was masked before escaping


def test_json_lines_parse_with_fields_extras_and_secrets_masked() -> None:
    out = run_logging("json")
    assert out.isascii()
    lines = out.split("\n")
    assert lines[-1] == ""
    entries = [json.loads(line) for line in lines[:-1]]
    assert len(entries) == RECORDS

    for entry in entries:
        assert {"ts", "level", "logger", "thread", "message"} <= entry.keys()
        assert entry["logger"] == "lightning_lora.worker.app"
        assert entry["thread"] == "MainThread"
        assert entry["ts"].endswith("Z")
        assert datetime.fromisoformat(entry["ts"]).utcoffset().total_seconds() == 0

    # the hostile text comes back exactly, escaped only on the wire
    assert entries[0]["message"] == "downloaded styles/7/images/a\u2028b\u2029c\x85d.png"
    assert entries[0]["level"] == "INFO"
    assert entries[1]["message"] == f"backend said: ok\r\n{FORGED}"
    assert entries[1]["level"] == "WARNING"
    assert entries[2]["message"] == "colour \x1b[31mred\x1b[0m\x07\x00"
    assert entries[3]["message"] == "hf *** internal ***"
    assert entries[4]["message"] == "job started"
    assert entries[4]["job_id"] == "job-1" and entries[4]["style_id"] == 7
    assert entries[4]["note"] == "***"  # extra fields are redacted too
    assert "exc" not in entries[4]
    assert entries[5]["level"] == "ERROR" and entries[5]["message"] == "job failed"
    assert entries[5]["exc"].startswith("Traceback (most recent call last):\n")
    assert entries[5]["exc"].endswith("ValueError: bad \x1b[2J value ***")
    assert HF_TOKEN not in out and json.dumps(TAB_TOKEN)[1:-1] not in out


def test_unknown_log_format_is_rejected_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="LOG_FORMAT must be one of text, json, got 'xml'"):
        configure_logging("info", "xml")
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud", "text")


def test_escape_control() -> None:
    assert escape_control("plain ünïcödé text") == "plain ünïcödé text"
    assert escape_control("a\nb\rc\td\x1b\x7f\x85\u2028\u2029") == (
        "a\\nb\\rc\\td\\x1b\\x7f\\x85\\u2028\\u2029"
    )
    assert escape_control("line1\nline2\x1b", keep_newlines=True) == "line1\nline2\\x1b"
