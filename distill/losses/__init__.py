"""Distillation losses, one registry: a method is chosen by name and adding one touches one place.

Every loss takes the student and teacher outputs as a :class:`~distill.losses.base.DistillInputs`
and returns a scalar; each documents its normalisation and τ² convention.
"""
from distill.losses.base import (DETECT_LOSSES, LOSSES, DistillInputs, LossContext, build_loss,
                                  build_losses, loss_options, loss_registry, method_names)
# Importing a loss module registers its loss under its method name.
from distill.losses import bckd, bpkd, cirkd, cwd, det_kd, logit_kd, skd  # noqa: F401

__all__ = ["DETECT_LOSSES", "LOSSES", "DistillInputs", "LossContext", "build_loss", "build_losses",
           "loss_options", "loss_registry", "method_names"]
