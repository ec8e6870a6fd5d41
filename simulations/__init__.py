"""Runnable simulations of enclave_keys nodes: ``python -m simulations``."""
