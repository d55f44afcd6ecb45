"""The GPU acceptance run behind benchmarks/gpu_acceptance.py (the command line, and how to run it on the GPU
machine, are there).

Like the other benchmark scripts' siblings (``_common``, ``kd_table``) this package is imported as a top-level
module: ``python benchmarks/gpu_acceptance.py`` puts benchmarks/ first on ``sys.path``, and a test that loads the
script puts it there first. Modules, in the order a run uses them:

- ``core``: the parts and their titles, ``PartRecord``, ``Command``, the skip exceptions;
- ``sizes``: the networks and sizes of the GPU run and of the dry run, and the dataset ``--data`` names;
- ``context``: ``Acceptance``, the state the parts share (budget, subprocesses, data, the exported student);
- ``environment``: parts 1-2, the carried wheels and the environment record;
- ``training``: parts 3-4, every KD method per precision and train_throughput.py;
- ``torchrun``: part 5, ``kdpipe run`` under torchrun and the process-group probe;
- ``exports``: parts 6-7, onnxruntime's CUDA provider and TensorRT engines, with parity and benchmarks;
- ``suite``: part 8, the suite's gpu/tensorrt tests;
- ``parts``: ``run_part``, which runs, times and records one part;
- ``report``: the JSON and the Markdown report.

Nothing is imported here: the wheels part must run before anything imports torch or kdpipe.
"""
