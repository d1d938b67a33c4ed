"""The embedded synthetic face benchmark: procedural identities (identity), rendered under pose, light and
other nuisances (scene, render), written in the real insightface formats (writer)."""
from pipeline.synthetic.writer import contact_sheet, synthesize

__all__ = ["contact_sheet", "synthesize"]
