"""The embedded synthetic face benchmark: procedural identities (identity), rendered under pose, light and
other nuisances (scene, render), written in the real insightface formats (writer)."""
from pipeline.synthetic.writer import SyntheticConfig, contact_sheet, synthesize

__all__ = ["SyntheticConfig", "contact_sheet", "synthesize"]
