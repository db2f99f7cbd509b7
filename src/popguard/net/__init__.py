"""What every network service shares: the asyncio serving loop, byte streams, and TLS."""
