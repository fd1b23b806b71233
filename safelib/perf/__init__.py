"""Performance: where a dense-map cache should live on a given machine (planner) and the rates measured here.

Sits above ``methods`` because calibration times SAFE's own training step.
"""
from .calibration import calibrate, plan_for_maps
from .planner import (PROFILES, CachePlan, DeviceProfile, NoFit, PlanError, Rates, Workload, get_profile, plan_cache,
                      profile_here, try_plan_cache)

__all__ = [
    "PROFILES", "CachePlan", "DeviceProfile", "NoFit", "PlanError", "Rates", "Workload", "calibrate", "get_profile",
    "plan_cache", "plan_for_maps", "profile_here", "try_plan_cache",
]
