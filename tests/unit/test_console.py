"""A command's own lines reach the terminal; what libraries and child processes print goes to the log file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, os, subprocess, sys
from rlhf import console
from tqdm import tqdm

print("before: a plain print")
with console.logs_to_file(__import__("pathlib").Path(sys.argv[1])):
    console.say("[1/2] a stage line")
    print("a library's print")
    logging.getLogger("ray").warning("a library's log record")
    os.write(2, b"native stderr\\n")
    subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
    for _ in tqdm(range(3), desc="steps", file=console.stream()):
        pass
    console.say("summary line")
print("after: a plain print")
raise SystemExit("error: shown on the terminal")
"""


def test_logs_to_file_keeps_the_terminal_to_stage_lines_bars_and_summary(tmp_path: Path) -> None:
    log = tmp_path / "run" / "demo.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60)
    terminal = done.stdout + done.stderr
    for line in ("before: a plain print", "[1/2] a stage line", "steps: 100%", "summary line", "after: a plain print",
                 "error: shown on the terminal"):  # fmt: skip
        assert line in terminal, terminal
    written = log.read_text()
    for line in ("a library's print", "a library's log record", "native stderr", "a child process"):
        assert line in written and line not in terminal, (line, terminal)
    assert "stage line" not in written and "steps" not in written
