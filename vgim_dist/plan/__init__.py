"""Planning stages for the hardware: profile the modules, then choose split, replicas and threads."""

from vgim_dist.plan.planner import CostModel, ModuleProfile, Plan, Profile, Timing, estimate, plan, rank, table

__all__ = ["CostModel", "ModuleProfile", "Plan", "Profile", "Timing", "estimate", "plan", "rank", "table"]
