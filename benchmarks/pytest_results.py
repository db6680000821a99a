"""A pytest plugin (`-p benchmarks.pytest_results`) that appends one JSON line per finished test
to the file $JPAGED_PYTEST_RESULTS as it finishes, so a run cut off still leaves its table."""

from __future__ import annotations

import json
import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("JPAGED_PYTEST_RESULTS")
    # One line per test: its call phase, or the phase that decided it (a skip or an error in set-up).
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
    message = ""
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    elif report.outcome == "failed":
        message = str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
    with open(path, "a") as f:
        f.write(json.dumps(dict(test=report.nodeid, outcome=outcome, seconds=round(report.duration, 3),
                                message=message)) + "\n")
