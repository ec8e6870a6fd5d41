"""Tools for testing nodes built on enclave_keys.

* :mod:`enclave_keys.testing.strategies` -- Hypothesis strategies for ids, failure
  reasons, every registered event type and stored events. Needs the ``test`` extra
  (``pip install enclave-keys[test]``), which brings Hypothesis.

This package imports nothing itself, so importing it never requires Hypothesis.
"""
