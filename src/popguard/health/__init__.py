"""Managed availability: probes, monitors and health sets (Exchange's MSExchangeHM)."""
