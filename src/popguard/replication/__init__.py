"""Shipping each active copy's change log to its passive copies, and moving the active copy."""
