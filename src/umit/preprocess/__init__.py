"""Preprocessing: fingerprint -> plan -> per-case reorient/crop/normalize/resample -> Zarr store.

Import the pieces from their modules (``umit.preprocess.run``, ``.store``, ``.plan``); this
package file stays light so that spawned workers and ``umit --help`` start fast.
"""

from umit.data.plan import ChannelPlan, Plan
from umit.data.store import Store, StoreCase

__all__ = ["ChannelPlan", "Plan", "Store", "StoreCase"]
