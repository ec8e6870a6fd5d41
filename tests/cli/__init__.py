"""Tests of the operator command line, ``enclave_keys.cli``."""
