"""Stand-in for transformers' tests/generation/test_utils.py (not in its sdist): vision models do not generate."""


class GenerationTesterMixin:
    pass
