"""The management shell: `popguard <cmdlet>`, one module per command group."""
