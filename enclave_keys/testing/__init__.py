"""Tools for testing nodes built on enclave_keys.

* :mod:`enclave_keys.testing.strategies` -- Hypothesis strategies for ids, failure
  reasons, every registered event type and stored events. Needs the ``test`` extra
  (``pip install enclave-keys[test]``), which brings Hypothesis. Also terminal events and
  whole round lives with their expected outcome (``round_scripts``, ``RoundOutcome``).
* :mod:`enclave_keys.testing.statemachine` -- ``NodeStateMachine``, a Hypothesis state
  machine over a whole node, checked against a model; subclass it with your own actors,
  rules and invariants (needs Hypothesis too).
* :mod:`enclave_keys.testing.fakes` -- ``ManualClock``, ``MemoryStore``,
  ``FixedKeyUnseal`` and ``FaultyStore`` (no Hypothesis needed).
* :mod:`enclave_keys.testing.forensics` -- ``scan_data_dir``, a raw-byte attacker that
  knows the master secret: which round keys can a data directory still give? For tests of
  forward secrecy at rest (``docs/forward-secrecy.md``).

See ``docs/testing.md``.

This package imports nothing itself, so importing it never requires Hypothesis.
"""
