"""The embedded synthetic face benchmark: procedural identities (identity), rendered under pose, light and
other nuisances (scene, render), written in the real insightface formats (writer).

Deliberately empty: import from the defining module (`from pipeline.synthetic.writer import synthesize`)."""
