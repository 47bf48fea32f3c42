import subprocess
import sys

import vilbert.datasets as datasets


def test_every_public_name_resolves():
    for name in datasets.__all__:
        assert getattr(datasets, name) is not None


def test_records_import_stays_light():
    # Extraction workers import the record type; that must not load the storage or torch stacks.
    code = ("import sys; from vilbert.datasets import RegionFeatures; "
            "print(sorted(m for m in ('pyarrow', 'h5py', 'lmdb', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
