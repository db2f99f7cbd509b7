"""Starting, stopping and supervising popguard's processes (supervisord, systemd), and faults."""
