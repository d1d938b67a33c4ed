"""Verification metrics (metrics), evaluation of a model on a data folder (verification) and the
teacher-vs-students report (report).

Deliberately empty: import from the defining module, so importing one piece does not import them all."""
