"""cmray: consistency models trained at cluster scale."""

__version__ = "0.1.0"

import os as _os

# Lines Ray prints in every run that say nothing a user can act on, kept out of the driver's
# log (Ray's own filter; set RAY_DEDUP_LOGS_SKIP_REGEX to choose another): Ray Train's
# PreemptionWatcher is an actor that can restart and takes its arguments from the object
# store, which Ray reports as an error each run (ray-project/ray#53727). Set here because Ray
# reads the variable once, when first imported.
RAY_NOISE = r"'PreemptionWatcher'.* has constructor arguments in the object store"
_os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_NOISE)
