"""The POP3 protocol, sans I/O: shared by the back end, the proxy, clients and probes."""
