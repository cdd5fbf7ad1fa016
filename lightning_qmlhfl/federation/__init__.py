"""Who takes part and when: participation rules, availability, the per-period population, the simulated clock
and a changing tree (mobility)."""
