"""The fleet monitor: its rules (pure: stale, timeout, missed, config_invalid), the
monitor service with its alerts, state and status API, and the dashboard page."""
