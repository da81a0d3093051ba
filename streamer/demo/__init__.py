"""The demo and the test bed it shares with the tests: network namespaces
and traffic (testbed.py), local servers (local_servers.py), the datapath demo
and the whole-pipeline demo. Not part of the daemon: nothing below imports
it."""
