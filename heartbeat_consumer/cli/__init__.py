"""The ``heartbeat-consumer`` command line.

Exit codes: 0 ok; 1 the config (or state) cannot be used; 2 usage error;
3 a check run failed or timed out (``run-once``).

- :mod:`.parser`: the options and one sub-parser per command;
- :mod:`.local`: the commands that need no broker;
- :mod:`.bus`: the commands that talk to RabbitMQ (imported only when one runs);
- :mod:`.render`, :mod:`.common`: printing, and what every command shares;
- :mod:`.main`: ``main``.
"""

from .main import main

__all__ = ["main"]
