"""On-disk formats: insightface RecordIO (recordio, dmlc_recordio), verification .bin (verification_bin),
image folders (image_folder), IJB releases (ijb), and `open_face_source` (source), which picks one by path.

Deliberately empty: import from the defining module, so reading one format does not import the others."""
