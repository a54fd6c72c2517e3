"""The planner's one error (a TSPConfigError, so the command line reports it as any bad option)."""

from ..config import TSPConfigError


class PlanError(TSPConfigError):
    """A model, layout, training setting or hardware profile the planner cannot evaluate."""
