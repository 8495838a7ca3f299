"""Operating a long-running component: lifecycle (service), /health and /metrics over
HTTP, Prometheus metrics, logs and systemd's notify protocol."""
