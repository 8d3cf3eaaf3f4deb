"""Noise schedules. The model never knows about them: pipelines and objectives combine the two."""

from mag.schedulers.flow_matching import FlowMatchScheduler, shift_sigma

__all__ = ["FlowMatchScheduler", "shift_sigma"]
