"""Before training: the per-block cost model (profile) and predictions and FLOPs targets (plan)."""
