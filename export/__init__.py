"""charrnn-export. Importing this package must not import torch: the server reads the manifest format
(export/manifest.py, torch-free) and the server image has no torch. torch lives in models.py and trace.py
only, imported by the export CLI and repository writer (tests/test_layout.py checks both)."""
