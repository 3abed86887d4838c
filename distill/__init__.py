"""bckd distill stage: teacher/student segmentation models and BCKD / baseline distillation.

Runs on the host with torch. It writes a student-only checkpoint whose model card records the
architecture (``Segmentor.arch``) so that the export stage can rebuild the model without asking.
"""
