"""One agent at run time: a tick's work (engine), the state file and its lock (store),
and the local clock (local). Imports only the core and the handlers."""
