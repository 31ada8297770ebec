"""The planner: a calibrated model of the data-parallel step at N devices (`distributed-step plan`)."""
