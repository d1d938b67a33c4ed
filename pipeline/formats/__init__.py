"""On-disk formats: insightface RecordIO, verification .bin, image folders."""
