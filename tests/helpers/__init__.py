"""Code the tests share, one topic per module:

- data: small data sets written in the real formats, in-memory face sources, random encoded images;
- teachers: tiny teachers saved as pipeline checkpoints, a teacher wrapper that fails on purpose;
- training: tiny training configs, distillation builders, trainee capture, small reference trainings;
- arcface_reference: an independent reference of arcface_torch's networks (layouts and a functional forward).

Imported as `helpers`: pytest puts tests/ on sys.path (tests/ holds conftest.py and no __init__.py), and the
scripts in tests/workers put it there themselves. Not test modules themselves.
"""
