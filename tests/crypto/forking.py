"""Running a probe in a child made by ``os.fork()`` (for the fork-safety tests)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def in_forked_child(probe: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run ``probe`` in a child made by ``os.fork()`` and return what it reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any cleanup
        status = 0
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(probe()).encode())
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the probe failed in the child"
    return json.loads(report)  # type: ignore[no-any-return]
