"""A stand-in trainer for tests/test_launch.py, run under torchrun: says its pid, then does what argv says.

    silent      print nothing more (a hung collective)
    chatty      print a line every 0.2 s forever (a run that never ends)
    cancelled   say it stopped on a signal after saving, and exit 75 (what model/run_control.py does)
    until-term  wait for SIGTERM (from torchrun, or from the kernel when torchrun dies), then do as cancelled
"""

import os
import signal
import sys
import time

from model.run_control import CANCELLED_EXIT_CODE, die_with_parent

MODES = ("silent", "chatty", "cancelled", "until-term")
mode = next(arg for arg in sys.argv[1:] if arg in MODES)  # other arguments only mark the process for the test
print(f"worker pid {os.getpid()}", flush=True)


def stop(*_):
    if "STOP_MARKER" in os.environ:  # where the test looks once nobody reads this output any more
        open(os.environ["STOP_MARKER"], "w").write("stopped")
    print("stopped by signal 15 at step 3: checkpoint 3 is complete", flush=True)
    sys.exit(CANCELLED_EXIT_CODE)


if mode == "silent":
    time.sleep(120)
elif mode == "chatty":
    while True:
        print("tick", flush=True)
        time.sleep(0.2)
elif mode == "cancelled":
    stop()
elif mode == "until-term":
    signal.signal(signal.SIGTERM, stop)
    die_with_parent()
    while True:
        time.sleep(0.1)
