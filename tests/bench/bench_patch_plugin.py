"""pytest plugin: run the suite with the prototypes of variants.py applied, to check them.

    BENCH_PATCHES=get,save2 PYTHONPATH=tests/bench python3 -m pytest -p bench_patch_plugin \
        tests/test_storage.py

Only for vetting proposed fixes; the package itself is not changed.
"""

import os

from variants import apply_patches

apply_patches(set(filter(None, os.environ.get("BENCH_PATCHES", "").split(","))))
