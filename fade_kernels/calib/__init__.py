"""Calibration: audio -> encoder inputs and teacher-forcing tokens, block-input capture, statistics."""
from fade_kernels.calib.samples import CalibSample, prepare_samples

__all__ = ["CalibSample", "prepare_samples"]
