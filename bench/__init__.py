"""POP3 benchmarks: popguard's back end against Dovecot, driven by one load generator."""
