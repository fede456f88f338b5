"""fleetwire: device management for IoT fleets."""
