"""The project's offline datasets as TFDS builders (`glyphs`, `digits`).

They store raw uint8 image tensors in ArrayRecord files, which TFDS reads with
`builder.as_data_source` without TensorFlow (PNG-encoded `tfds.features.Image` needs
TensorFlow to write). Version 1.0.0 was the TFRecord/PNG layout; a data dir that holds only
that version is rebuilt once (`tlresearch.data.loader`). The images are the same bytes in both.
"""
FORMAT_VERSION = "2.0.0"
RELEASE_NOTES = {
    "1.0.0": "Initial release (TFRecord, PNG-encoded images).",
    "2.0.0": "ArrayRecord with raw uint8 image tensors: read without TensorFlow; same images.",
}
FILE_FORMAT = "array_record"
