"""Live configuration: the daemon's control socket and SIGHUP (server.py),
and `ctstream config check|apply|show` (command.py)."""
