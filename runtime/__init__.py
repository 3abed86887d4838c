"""bckd runtime stage: data, backends, latency profiling, evaluation and reports.

Torch-free by design (architecture.md rule 1): this package imports with numpy alone, and loads
heavy optional packages lazily through :mod:`runtime.lazy`.
"""
__version__ = "0.1.0"
