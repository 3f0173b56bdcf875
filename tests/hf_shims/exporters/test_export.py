"""Stand-in for transformers' tests/exporters/test_export.py (not in its sdist): no export tests."""


class ExportTesterMixin:
    pass
