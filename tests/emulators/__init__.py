"""Emulators of the providers' APIs and a bot sink, as real aiohttp apps for the tests and bench."""
