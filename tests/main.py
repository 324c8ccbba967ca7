"""`make test`: run pytest, then end the process with pytest's status, without Python's teardown.

This one process runs dozens of searches: Ray drivers connect and shut down again, ONNX
Runtime sessions and dynamo exports come and go, worker pools start and stop. Once, in CI,
a native library's teardown crashed after all of that (a segmentation fault after "278
passed"), and make reported the run as failed. Nothing is left to do once pytest has
returned: its report is printed and its temporary folders are handled. So the process ends
there with pytest's own status (``os._exit``). The searches the tests run as processes of
their own (the CLI) exit the normal way, and the tests assert their exit codes.

Set ``AUTOPRUNE_TEST_FULL_EXIT=1`` to keep the teardown, e.g. to look into such a crash with
``python -X faulthandler tests/main.py``.
"""

from __future__ import annotations

import os
import sys

import pytest

if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # as `python -m pytest` does
    status = int(pytest.main(sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("AUTOPRUNE_TEST_FULL_EXIT") == "1":
        sys.exit(status)
    os._exit(status)
