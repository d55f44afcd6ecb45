"""Export a trained model for deployment: ONNX (fp32, int8 QDQ, fp16), TensorRT engines, and parity checks.

Library functions only; the pipeline stages that call them live in ``kdpipe.stages``. onnx, onnxruntime and
onnxslim (the ``export`` extra) and tensorrt are imported inside the functions that need them, so importing this
package costs nothing and works without them.
"""

from __future__ import annotations

from kdpipe.exports.onnx import (
    OnnxExport,
    Preprocessing,
    check_opset,
    export_onnx,
    read_metadata,
    read_preprocessing,
    supported_opsets,
)
from kdpipe.exports.parity import (
    ParityReport,
    ParityTolerance,
    check_parity,
    enforce_parity,
    measure_parity,
    parity_gates,
)
from kdpipe.exports.quantize import convert_fp16, count_qdq_nodes, quantize_int8
from kdpipe.exports.runtime import (
    OnnxRunner,
    create_onnx_runner,
    create_onnx_session,
    onnx_providers,
    run_onnx,
    session_summary,
)
from kdpipe.exports.tensorrt import (
    EngineStamp,
    TensorRTRunner,
    build_engine,
    check_onnx_for_tensorrt,
    check_stamp,
    load_engine,
    require_tensorrt,
    tensorrt_version,
)

__all__ = [
    "EngineStamp",
    "OnnxExport",
    "OnnxRunner",
    "ParityReport",
    "ParityTolerance",
    "Preprocessing",
    "TensorRTRunner",
    "build_engine",
    "check_onnx_for_tensorrt",
    "check_opset",
    "check_parity",
    "check_stamp",
    "convert_fp16",
    "count_qdq_nodes",
    "create_onnx_runner",
    "create_onnx_session",
    "enforce_parity",
    "export_onnx",
    "load_engine",
    "measure_parity",
    "onnx_providers",
    "parity_gates",
    "quantize_int8",
    "read_metadata",
    "read_preprocessing",
    "require_tensorrt",
    "run_onnx",
    "session_summary",
    "supported_opsets",
    "tensorrt_version",
]
