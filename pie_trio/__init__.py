"""pie-trio: a programmable LLM serving system on trio."""

import os

# OpenMP worker threads that spin-wait between parallel regions (the default) take the CPU from
# the guest and trio threads that must run between two forward passes; on a small CPU that
# added ~10 % to every inferlet token. Passive waiting leaves the forward itself as fast. It
# only takes effect if set before torch loads OpenMP, hence here; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
