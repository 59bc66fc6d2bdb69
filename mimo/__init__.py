"""The model's facts, at the bottom of the imports.

``mimo`` holds what MiMo-V2-Flash *is*, independent of how it is converted, stored or run:

- :mod:`mimo.config`: the configuration (hub key names), parsed from the hub or transformers form;
- :mod:`mimo.names`: the checkpoint's tensor names, one table with one format/parse pair;
- :mod:`mimo.fp8`: the FP8 block-scale rule, the full-attention fused K/V grid included;
- :mod:`mimo.layout`: the parallel layout, one row per output array kind.

``loader``, ``pipeline`` and ``runtime`` import ``mimo``; ``mimo`` imports none of them
(``tests/test_imports.py`` enforces the direction). See ``docs/architecture.md``.
"""
