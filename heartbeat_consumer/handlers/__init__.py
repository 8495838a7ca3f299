"""Handlers: the registry and plugin loading (registry), running a child process
(process), the built-in handlers (builtin, agent_turn, openclaw) and the HEARTBEAT_OK
contract (heartbeat_md). Imports only the core.

Plugins register with ``from heartbeat_consumer import register_handler``."""
