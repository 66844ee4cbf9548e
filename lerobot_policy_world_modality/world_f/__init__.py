"""The `world_f` policy type: configuration, model and processors, found by LeRobot by naming convention."""
