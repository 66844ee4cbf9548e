"""The `world_token_c` policy type: configuration, model and processors, found by LeRobot by naming convention."""
