"""The run's result: one JSON (``write_result`` of benchmarks/_common.py: environment, versions, commit) with every
part's record and every target, and one Markdown report beside it: the environment, one row per part, then each
part's numbers and targets."""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from pathlib import Path
from typing import Any

from _common import write_result

from .context import Acceptance
from .core import TITLES, PartRecord


def all_targets(records: dict[str, PartRecord]) -> dict[str, dict[str, Any]]:
    """Every part's targets, keyed ``<part>.<target>``."""
    return {f"{r.name}.{k}": v for r in records.values() for k, v in r.targets.items()}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def markdown(payload: dict[str, Any]) -> str:
    """The report for people: environment, one row per part, then each part's numbers."""
    env, parts = payload["environment_summary"], payload["parts"]
    lines = [
        f"# kdpipe GPU acceptance{' (dry run on CPU)' if payload['dry_run'] else ''}",
        "",
        f"- device: {payload['device']}; data: {payload['data'].get('source', '')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if v),
        f"- commit {payload['commit']}; {payload['date']}; budget {payload['budget_s']:.0f} s, "
        f"took {payload['seconds']:.0f} s",
        f"- command: `{payload['command']}`",
        "",
        "| part | status | seconds | summary | targets |",
        "|---|---|---|---|---|",
    ]
    for name, part in parts.items():
        targets = part["targets"].values()
        met = sum(t["met"] is True for t in targets)
        missed = sum(t["met"] is False for t in targets)
        unmeasured = sum(t["met"] is None for t in targets)
        tally = f"{met} met, {missed} missed, {unmeasured} not measured" if part["targets"] else ""
        text = part["summary"] if part["status"] == "ok" else (part["reason"] or part["error"] or "")
        text = text.splitlines()[0] if text else ""
        lines.append(f"| {name} | {part['status']} | {part['seconds']:.1f} | {text.replace('|', '/')} | {tally} |")
    for name, part in parts.items():
        lines += ["", f"## {TITLES[name]}: {part['status']}", ""]
        if part["reason"]:
            lines.append(f"Reason: {part['reason']}")
        if part["error"]:
            lines += ["Error:", "", "```", part["error"], "```"]
        if part["summary"]:
            lines.append(f"Summary: {part['summary']}")
        lines += _part_details(name, part["results"])
        if part["targets"]:
            lines += ["", "| target | rule | value | threshold | met |", "|---|---|---|---|---|"]
            for key, t in part["targets"].items():
                verdict = {True: "met", False: "MISSED", None: f"not measured: {t['why']}"}[t["met"]]
                if t["met"] is False and t["why"]:
                    verdict += f" ({t['why']})"
                lines.append(f"| {key} | {t['rule']} | {_fmt(t['value'])} | {_fmt(t['threshold'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def _part_details(name: str, results: dict[str, Any]) -> list[str]:
    """Tables of one part's numbers."""
    lines: list[str] = []
    if name == "wheels":
        lines += ["", "| module | importable | version / error |", "|---|---|---|"]
        for module, info in results.get("importable", {}).items():
            what = info.get("version") if info["importable"] else info["error"]
            extra = f" {info['providers']}" if "providers" in info else ""
            lines.append(f"| {module} | {info['importable']} | {what}{extra} |")
    elif name == "methods":
        lines += [
            "",
            "| method | precision (ran) | status | steps | train loss | s | peak CUDA MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in results.get("cells", []):
            ran = f"{c['precision_requested']} ({c.get('precision', '-')})"
            peak = f"{c['peak_cuda_bytes'] / 2**20:.0f}" if c.get("peak_cuda_bytes") else ""
            loss = f"{c['train_loss']:.4f}" if "train_loss" in c else c.get("error") or c.get("reason", "")
            cells = [c["method"], ran, c["status"], c.get("steps", ""), loss, c.get("seconds", ""), peak]
            lines.append("| " + " | ".join(str(v).replace("|", "/") for v in cells) + " |")
    elif name == "throughput":
        lines += [
            "",
            "| variant | status | kdpipe img/s | plain img/s | kdpipe/plain time | kdpipe max MB |",
            "|---|---|---|---|---|---|",
        ]
        for variant, r in results.get("variants", {}).items():
            if r["status"] != "ok":
                lines.append(f"| {variant} | {r['status']}: {(r.get('reason') or r.get('error', ''))[:200]} | | | | |")
                continue
            mem = r.get("kdpipe_max_memory_allocated_bytes") or r.get("peak_rss_bytes") or 0
            lines.append(
                f"| {variant} | ok | {r['kdpipe_images_per_s']:,.0f} | {r['plain_images_per_s']:,.0f} | "
                f"{r['kdpipe_over_plain_time']:.3f} | {mem / 2**20:.0f} |"
            )
    elif name == "torchrun":
        keys = (
            *("nproc_per_node", "summary_status", "exit_code", "stages", "world_size", "distributed_backend"),
            "kdpipe_process_group",
        )
        lines += [""] + [f"- {k}: {results.get(k)}" for k in keys]
        probe = results.get("probe", {})
        lines.append(
            f"- probe: backend {probe.get('backend')}, all_reduce ok {probe.get('all_reduce_ok')}, "
            f"kdpipe world {probe.get('kdpipe_world')}"
        )
    elif name in ("onnxruntime_cuda", "tensorrt"):
        student = results.get("student", {})
        if student:
            lines.append(
                f"\nStudent: {student.get('model')}, {student.get('epochs')} epochs "
                f"({student.get('precision')}), test top-1 {_fmt(student.get('test_top1'))}"
            )
        bench = results.get("bench") or results.get("cpu_stand_in", {}).get("bench") or []
        lines += _bench_table(bench)
        for tag, engine in results.get("engines", {}).items():
            lines.append(f"\nEngine {tag}: {engine.get('status')}, {engine.get('parity_line') or engine.get('error')}")
            lines += _bench_table(engine.get("bench", []))
        if "qad" in results:
            qad = results["qad"]
            lines.append(f"\nqad stage's QDQ graph: {qad.get('status')}; {qad.get('reason') or qad.get('metrics', '')}")
        cli = results.get("cpu_stand_in", {}).get("kdpipe_bench_cli")
        if cli:
            lines.append(f"\n`kdpipe bench` of the int8 graph (stand-in): exit {cli['rc']}")
            lines += _bench_table(cli["cells"])
    elif name == "gpu_tests":
        lines += ["", f"- counts: {results.get('counts')}", f"- note: {results.get('note')}"]
        lines += [f"- {c['outcome']}: {c['test']} {c['message'] or ''}" for c in results.get("cases", [])]
    return lines


def _bench_table(cells: list[dict[str, Any]]) -> list[str]:
    if not cells:
        return []
    lines = ["", "| batch | p50 ms | p99 ms | images/s | timer | device | error |", "|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(
            f"| {c.get('batch_size')} | {_fmt(c.get('p50_ms'))} | {_fmt(c.get('p99_ms'))} | "
            f"{_fmt(c.get('throughput'))} | {c.get('timer')} | {c.get('device')} | {c.get('error') or ''} |"
        )
    return lines


def write_reports(acc: Acceptance, argv: list[str]) -> tuple[Path, Path]:
    """Write ``--out`` (the JSON) and the Markdown beside it; return both paths. ``argv``: the command, for the
    record."""
    env = acc.records.get("environment")
    record = env.results.get("environment", {}) if env else {}
    versions = acc.records["wheels"].results.get("importable", {})
    payload: dict[str, Any] = {
        "dry_run": acc.dry_run,
        "device": f"{acc.device}" + (f" ({record.get('gpu')})" if record.get("gpu") else ""),
        "command": " ".join(["python", *argv]),
        "date": record.get("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        "commit": record.get("commit", "unknown"),
        "budget_s": acc.args.budget_s,
        "seconds": round(time.perf_counter() - acc.started, 1),
        "sizes": dataclasses.asdict(acc.sizes),
        "data": acc.data_record or {"source": acc.data.label},
        "student": acc.student_record,
        "environment_summary": {
            "python": record.get("python"),
            "torch": record.get("torch"),
            "cuda": record.get("cuda"),
            **{k: v.get("version") for k, v in versions.items() if v.get("importable") and k != "torch"},
            "onnxruntime providers": ",".join(versions.get("onnxruntime", {}).get("providers", [])) or None,
        },
        "parts": {name: _record_dict(rec) for name, rec in acc.records.items()},
    }
    targets = all_targets(acc.records)
    payload["targets"] = targets
    measured = [t["met"] for t in targets.values() if t["met"] is not None]
    payload["all_targets_met"] = all(measured) if measured else None
    payload["status_counts"] = {
        s: sum(r.status == s for r in acc.records.values()) for s in ("ok", "failed", "skipped")
    }
    out: Path = acc.args.out
    path = write_result(out.stem, payload, out.parent)
    md = path.with_suffix(".md")
    md.write_text(markdown(payload), encoding="utf-8")
    return path, md


def _record_dict(rec: PartRecord) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(rec), default=str))  # tensors, paths and numpy scalars as text
