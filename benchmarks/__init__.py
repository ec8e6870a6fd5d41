"""Benchmarks of enclave_keys against the bare primitives and against a peer library.

Run ``python -m benchmarks`` (``make bench``); ``--help`` lists the options. Every figure
is a median over several repeats, reported beside a baseline measured in the same run
(raw LMDB, raw ``AESGCM``, raw msgpack, or the ``eventsourcing`` library) and the ratio of
the two, because the machine is shared and absolute numbers drift between runs. See
``docs/performance.md`` for the method and the results.
"""
