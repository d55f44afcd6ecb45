"""Every check of a pipeline that needs no work, run before anything is written: the stage graph, data paths, what
the config needs from this machine (libraries, CUDA) and each stage's own checks."""

from __future__ import annotations

from kdpipe.config import LoadedConfig
from kdpipe.data import resolve_root
from kdpipe.environment import resolve_device
from kdpipe.errors import DataError
from kdpipe.pipeline.expand import expand_stages
from kdpipe.pipeline.graph import Node, build_graph
from kdpipe.pipeline.normalization import resolve_preprocessing
from kdpipe.requirements import Requirement, enforce, from_check
from kdpipe.tracking import requirements as tracking_requirements


def requirements(loaded: LoadedConfig, nodes: list[Node]) -> list[Requirement]:
    """Everything the config needs from this machine, met or not: the run's device, tracking libraries, and what each
    stage declares (``Stage.requirements``: export formats' libraries, benchmark backends, CUDA)."""
    reqs: list[Requirement] = []
    device = str(loaded.config.device)
    if device != "auto":
        reqs.append(from_check("CUDA" if device.startswith("cuda") else device, lambda: resolve_device(device),
                               field="device", where=loaded.where(("device",))))  # fmt: skip
    reqs += tracking_requirements(loaded)
    for node in nodes:
        reqs += node.stage_cls.requirements(node.name, node.config, loaded)
    return reqs


def preflight(loaded: LoadedConfig, *, check_requirements: bool = True) -> list[Node]:
    """Every check that needs no work: the graph, data paths, what the config needs from the machine, per-stage
    checks. Raises before anything is written. A config with a sweep is checked with its members expanded
    (``expand_stages``)."""
    loaded = expand_stages(loaded)
    nodes = build_graph(loaded)
    data = loaded.config.data
    root = resolve_root(data, loaded.base_dir)
    downloads = data.download and data.kind in ("cifar10", "cifar100")  # nothing else can be fetched into root
    if root is not None and not root.exists() and not downloads:
        raise DataError(
            f"{loaded.where(('data', 'root'))}: data.root: {root} does not exist",
            hint="fix the path (relative paths are resolved against the stages.yaml folder)",
        )
    if check_requirements:
        enforce(requirements(loaded, nodes))
    for node in nodes:
        node.stage_cls.preflight(node.name, node.config, loaded)
    resolve_preprocessing(loaded)  # conflicting pretrained normalisations or input sizes: config errors, before work
    return nodes
