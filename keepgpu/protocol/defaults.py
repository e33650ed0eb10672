"""Defaults of `keepgpu-supervise`, in one place: the CLI, the supervisor's config and the
worker's settings all read them from here (docs: README's CLI reference)."""

VRAM = "1GiB"
MODE = "duty"
TARGET_UTIL = 30.0  # percent
BUSY_THRESHOLD = 10.0  # percent; -1 = never back off for other processes
MAX_TEMP = 83.0  # degrees C
ON_PRESSURE = "yield"
HEARTBEAT_S = 2.0
HANG_TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0
JOIN_TIMEOUT_S = 5.0
KILL_TIMEOUT_S = 5.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 300.0
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 60.0
HEALTHY_RESET_S = 60.0
