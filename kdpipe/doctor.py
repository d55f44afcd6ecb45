"""``kdpipe doctor [STAGES_YAML]``: what this machine (or container) has, and what a config needs that it lacks.

Without a config it reports the versions of Python and the libraries kdpipe uses, onnxruntime's execution
providers, CUDA and its devices, and the CPU count; it exits 0 (a broken core install fails to start at all).
With a config it also validates it and lists every requirement the config's stages, device and tracking declare
(``kdpipe.pipeline.checks.requirements``): exit 0 when all are met, 2 with one line per missing thing and how to
install it, or the config's own error code when it is invalid (2; 3 for a data path). ``--require`` adds
requirements by name (``--require cuda --require tensorrt`` is the CUDA image's health check). ``--json`` prints the
same facts as one JSON document on stdout.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import click

import kdpipe
from kdpipe.errors import ConfigError, KdpipeError, handle_errors
from kdpipe.requirements import (
    EXPORT_HINT,
    TRACKING_HINT,
    Requirement,
    from_check,
    module_available,
    needs_cuda,
    needs_module,
)

# (label, import name): imported, so a package that is installed but broken shows up as such
_CORE = (("torch", "torch"), ("torchvision", "torchvision"), ("timm", "timm"), ("pydantic", "pydantic"))
_EXPORT = (("onnx", "onnx"), ("onnxruntime", "onnxruntime"), ("onnxslim", "onnxslim"))
# (label, distributions): only looked up, not imported (importing mlflow takes seconds)
_TRACKING = (("mlflow", ("mlflow", "mlflow-skinny")), ("tensorboard", ("tensorboard",)))
_LOOKED_UP = (("modelopt", ("nvidia-modelopt",)),)  # the qad stage's quantizer (export extra); slow to import
REQUIRE_CHOICES = ("cuda", "tensorrt", "onnx", "onnxruntime-cuda", "mlflow", "tensorboard")


def _imported_version(module: str) -> dict[str, Any]:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install's own error
        installed = module_available(module)
        return {"version": None, "error": f"{type(exc).__name__}: {exc}" if installed else "not installed"}
    return {"version": str(getattr(mod, "__version__", "unknown")), "error": None}


def _distribution_version(names: tuple[str, ...]) -> dict[str, Any]:
    for name in names:
        try:
            return {"version": importlib.metadata.version(name), "distribution": name, "error": None}
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"version": None, "distribution": None, "error": "not installed"}


def _cuda() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"available": bool(torch.cuda.is_available()), "torch_cuda": torch.version.cuda}
    info["devices"] = []
    if info["available"]:
        info["cudnn"] = torch.backends.cudnn.version()
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["devices"].append(
                {
                    "index": index,
                    "name": props.name,
                    "memory_bytes": int(props.total_memory),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    return info


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
"""/proc/cpuinfo flags of x86 int8 dot-product instructions, without which onnxruntime's u8 x s8 kernels saturate
8-bit weights (kdpipe's onnx-int8 uses 7-bit weights by default for that reason)."""


def cpu_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this x86 CPU has an int8 dot-product instruction (VNNI or AMX); None where that cannot be read."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    return None if flags is None else any(f in flags for f in VNNI_FLAGS)


def facts() -> dict[str, Any]:
    """Everything ``kdpipe doctor`` reports about the machine."""
    import torch

    from kdpipe.distill.precision import cpu_bf16
    from kdpipe.exports.tensorrt import tensorrt_version

    packages: dict[str, Any] = {label: _imported_version(module) for label, module in (*_CORE, *_EXPORT)}
    trt = tensorrt_version()
    packages["tensorrt"] = {
        "version": trt,
        "error": None if trt else "installed but does not import" if module_available("tensorrt") else "not installed",
    }
    packages.update({label: _distribution_version(dists) for label, dists in (*_LOOKED_UP, *_TRACKING)})
    providers: list[str] = []
    if packages["onnxruntime"]["version"]:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from kdpipe import plugins

    importlib.import_module("kdpipe.stages")  # registers the built-ins, then imports the installed plugins

    return {
        "kdpipe": kdpipe.__version__,
        "kdpipe_path": str(Path(kdpipe.__file__).parent),
        "python": {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform()},
        "packages": packages,
        "onnxruntime_providers": providers,
        "cuda": _cuda(),
        "cpu": {
            "count": os.cpu_count(),
            "usable": usable,
            "torch_threads": torch.get_num_threads(),
            "vnni": cpu_vnni(),
            "bf16": dict(zip(("native", "detail"), cpu_bf16(), strict=True)),
        },
        "plugins": {"loaded": plugins.load_plugins(), "failed": dict(plugins.FAILED)},
    }


def required(names: tuple[str, ...]) -> list[Requirement]:
    """Requirements named on the command line (``--require``), checked the way stages check them."""
    from kdpipe.exports.tensorrt import require_tensorrt
    from kdpipe.stages.benchmark import cuda_provider_requirement

    reqs: list[Requirement] = []
    kw: dict[str, Any] = {"field": "--require", "where": "kdpipe doctor"}
    for name in dict.fromkeys(names):
        if name == "cuda":
            reqs.append(needs_cuda(value="cuda", **kw))
        elif name == "tensorrt":
            reqs.append(from_check("tensorrt", require_tensorrt, **kw))
        elif name == "onnx":
            reqs += [needs_module(m, value=name, hint=EXPORT_HINT, **kw) for m in ("onnx", "onnxruntime")]
        elif name == "onnxruntime-cuda":
            reqs.append(needs_module("onnxruntime", value=name, hint=EXPORT_HINT, **kw))
            if reqs[-1].available:
                reqs.append(cuda_provider_requirement(**kw))
        else:  # mlflow, tensorboard
            reqs.append(needs_module(name, value=name, hint=TRACKING_HINT, **kw))
    return reqs


def check_config(
    path: Path, overrides: tuple[str, ...]
) -> tuple[dict[str, Any], list[Requirement], KdpipeError | None]:
    """Validate ``path`` and gather what it needs. Returns the report, the requirements, and the error that makes
    the config invalid (then the requirements are those known before it)."""
    import kdpipe.stages  # noqa: F401  (registers stage types before the config model is built)
    from kdpipe.config import load_config
    from kdpipe.overrides import from_env
    from kdpipe.pipeline.checks import preflight, requirements
    from kdpipe.pipeline.expand import expand_stages
    from kdpipe.pipeline.graph import build_graph

    report: dict[str, Any] = {"path": str(path), "valid": False, "error": None, "stages": []}
    reqs: list[Requirement] = []
    try:
        loaded = expand_stages(load_config(path, [*from_env(os.environ), *overrides]))
        nodes = build_graph(loaded)
        report["stages"] = [{"name": n.name, "type": n.type} for n in nodes]
        reqs = requirements(loaded, nodes)
        preflight(loaded, check_requirements=False)
    except KdpipeError as exc:
        report["error"] = {"message": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}
        return report, reqs, exc
    report["valid"] = True
    return report, reqs, None


def _line(label: str, value: str, note: str = "") -> str:
    return f"  {label:<12} {value}" + (f"  {note}" if note else "")


def render(info: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"kdpipe {info['kdpipe']} doctor"]
    py = info["python"]
    lines.append(_line("python", py["version"], py["executable"]))
    for label, pkg in info["packages"].items():
        value = pkg["version"] or (pkg["error"] or "not installed")
        note = ""
        if label == "onnxruntime" and pkg["version"]:
            note = "providers: " + ", ".join(info["onnxruntime_providers"])
        elif label == "torch" and pkg["version"]:
            note = f"CUDA build: {info['cuda']['torch_cuda'] or 'none'}"
        elif pkg.get("distribution") and pkg["distribution"] != label:
            note = f"({pkg['distribution']})"
        lines.append(_line(label, value, note))
    cuda = info["cuda"]
    if cuda["available"]:
        lines.append(_line("CUDA", f"available, {len(cuda['devices'])} device(s)", f"cuDNN {cuda.get('cudnn')}"))
        for dev in cuda["devices"]:
            gib = dev["memory_bytes"] / 2**30
            detail = f"{dev['name']}, {gib:.1f} GiB, compute capability {dev['capability']}"
            lines.append(_line(f"GPU {dev['index']}", detail))
    else:
        lines.append(_line("CUDA", "not available"))
    cpu = info["cpu"]
    lines.append(
        _line("CPUs", f"{cpu['usable']} usable of {cpu['count']}", f"torch uses {cpu['torch_threads']} threads")
    )
    if cpu.get("vnni") is not None:
        note = (
            "reduce_range: false is exact on this CPU"
            if cpu["vnni"]
            else "keep onnx-int8's default 7-bit weights (reduce_range): 8-bit ones saturate here"
        )
        lines.append(_line("VNNI", "yes" if cpu["vnni"] else "no", note))
    bf16 = cpu.get("bf16")
    if bf16 is not None:
        if bf16["native"]:
            lines.append(
                _line("CPU bf16", f"yes ({bf16['detail']})", "precision: bf16 trains with bf16 autocast on it")
            )
        else:
            lines.append(_line("CPU bf16", "no", "precision: bf16 trains in fp32 on this CPU: " + bf16["detail"]))
    for name, module in info.get("plugins", {}).get("loaded", {}).items():
        lines.append(_line(f"plugin {name}", "loaded", module))
    for name, error in info.get("plugins", {}).get("failed", {}).items():
        lines.append(_line(f"plugin {name}", "FAILED to import", error))
    config = info.get("config")
    if config is not None:
        names = ", ".join(s["name"] for s in config["stages"])
        state = "valid" if config["valid"] else "INVALID"
        lines.append(f"{config['path']}: {state}" + (f"; stages: {names}" if names else ""))
    for req in info.get("requirements", []):
        mark = "ok" if req["available"] else "MISSING" if req["fatal"] else "missing"
        effect = "" if req["available"] else "  (kdpipe run refuses to start)" if req["fatal"] else "  (degraded)"
        lines.append(f"  {mark:<8} {req['what']:<34} {req['field']}{effect}")
    return "\n".join(lines)


@click.command("doctor")
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of the report.")
@click.option(
    "--require",
    "require",
    multiple=True,
    type=click.Choice(REQUIRE_CHOICES),
    help="Also fail (exit 2) unless this is here (repeatable): " + ", ".join(REQUIRE_CHOICES) + ".",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a config value.")
@handle_errors
def doctor_command(config: Path | None, as_json: bool, require: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Report versions, devices and providers; with CONFIG, list what it needs that this machine lacks.

    Exit codes: 0 everything needed is here; 2 something is missing (one line each, with how to install it) or
    CONFIG is invalid; 3 CONFIG's data path does not exist.
    """
    info = facts()
    reqs = required(require)
    error: KdpipeError | None = None
    if config is not None:
        info["config"], config_reqs, error = check_config(config, overrides)
        reqs += config_reqs
    info["requirements"] = [r.to_dict() for r in reqs]
    missing = [r for r in reqs if not r.available]
    info["missing"] = [r.line for r in missing]
    exit_code = error.exit_code if error is not None else 2 if missing else 0
    info["ok"], info["exit_code"] = exit_code == 0, exit_code
    click.echo(json.dumps(info, indent=2, default=str) if as_json else render(info))
    if error is not None:
        raise error
    if missing:
        what = f"{config}: " if config is not None else ""
        lines = "\n".join(f"  - {r.line}" for r in missing)
        raise ConfigError(f"{what}{len(missing)} thing(s) needed are missing here:\n{lines}")
