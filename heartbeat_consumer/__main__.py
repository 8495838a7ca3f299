"""``python -m heartbeat_consumer``."""

from .cli import main

raise SystemExit(main())
