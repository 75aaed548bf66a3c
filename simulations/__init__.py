"""Shipped scenarios (``*.toml``) and the simulation runner (``fedtune simulate``)."""
