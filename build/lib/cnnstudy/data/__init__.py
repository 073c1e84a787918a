"""Data, from files to batches: files on disk and their checks (files.py), decoding
(sources.py), the decoded-data cache and the seeded splits (splits.py), batches cut from
tensors on the device and the Lightning DataModule (batches.py)."""
