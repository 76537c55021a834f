"""A rank that reports one step and exits, for the launcher's progress test:
``python -m tests.unit.rank_reports ARGUMENT``."""

import os

from planner.execution.launcher import print_progress

if os.environ["RANK"] == "0":
    print_progress(0, 1, "step 1 of 1")
