"""Part 8: the suite's gpu/tensorrt tests, ``pytest -m "gpu or tensorrt" --require-gpu`` on the GPU (tests/conftest.py:
a gpu/tensorrt test that cannot run fails with the reason instead of being skipped). Counts, and every failure and
skip with its reason, come from the JUnit XML."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .context import Acceptance
from .core import NEEDS_CUDA, PartRecord


def read_junit(path: Path) -> dict[str, Any]:
    """Outcome of every test case in a JUnit XML (errors and failures alike are failures), with reasons."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "")[:500]
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    return {"counts": counts, "cases": cases}


def part_gpu_tests(acc: Acceptance, rec: PartRecord) -> None:
    """The suite's gpu/tensorrt tests; on the GPU with --require-gpu, so a skip is a failure. Without tensorrt the
    tensorrt-marked tests are deselected, and the record says so; the dry run takes the same selection without the
    switch (everything skips on CPU)."""
    from kdpipe.exports import tensorrt_version

    marker, switch, note = "gpu or tensorrt", [], None
    if not acc.dry_run:
        switch = ["--require-gpu"]
        if tensorrt_version() is None:
            marker = "gpu and not tensorrt"
            note = "tensorrt does not import: the tensorrt-marked tests were deselected (carry its wheels to run them)"
    xml = acc.work / "gpu_tests.xml"
    command = acc.run(
        [
            *(sys.executable, "-m", "pytest", "-m", marker, *switch, "-p", "no:cacheprovider", "-q"),
            *("--continue-on-collection-errors", f"--junitxml={xml}", "tests"),
        ],
        timeout=300,
        name="gpu_tests",
    )
    junit = read_junit(xml) if xml.is_file() else {"counts": {}, "cases": []}
    rec.results.update(marker=marker, require_gpu=bool(switch), note=note, command=command.describe(), **junit)
    counts = junit["counts"]
    rec.summary = f"-m '{marker}'{' --require-gpu' if switch else ''}: " + ", ".join(
        f"{v} {k}" for k, v in counts.items()
    )
    if acc.dry_run:
        rec.target(
            "gpu_tests_pass",
            value=counts,
            threshold="exit 0, tests passed",
            rule="pytest --require-gpu exits 0 on the GPU",
            met=None,
            why=f"{NEEDS_CUDA}: they skip on CPU",
        )
    else:
        rec.target(
            "gpu_tests_pass",
            value=counts,
            threshold="exit 0, tests passed",
            rule="pytest --require-gpu exits 0 (a gpu/tensorrt test that could not run is a failure)",
            met=bool(command.rc == 0 and counts.get("passed", 0) > 0),
        )
    if command.rc not in (0, None) and not acc.dry_run:
        failed = [f"{c['test']}: {c['message']}" for c in junit["cases"] if c["outcome"] == "failed"]
        raise RuntimeError(f"pytest exited {command.rc}: " + ("; ".join(failed) or command.tail(1500)))
    command.check("pytest")
