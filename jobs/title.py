#!/usr/bin/env python3
"""Title-cases the payload, reporting progress on fd 3 (see README: "Job executables")."""
import os
import sys

data = sys.stdin.buffer.read()
if not data.strip():
    sys.stderr.write("title: empty payload\n")
    sys.exit(2)
progress_fd = int(os.environ.get("GEARSHIFT_PROGRESS_FD", "3"))
try:
    with os.fdopen(progress_fd, "w") as progress:
        progress.write("status 1 1\n")
except OSError:
    pass  # run by hand, without the progress channel
sys.stdout.write(data.decode("utf-8", "replace").title())
