"""bckd calibration stage: INT8 quantization from real calibration images (torch-free).

Calibration images are drawn from a dataset split through exactly the runtime preprocessing
(:mod:`runtime.data.preprocess`), and the split used is recorded so that evaluation can refuse to
score on it (architecture.md rule 5). The quantizers arrive with the export/INT8 issue.
"""
