"""Arrow schemas of the stage shards, the dropped tables and the published dataset."""
from __future__ import annotations

import json

import pyarrow as pa

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # Hugging Face `Image` layout
RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

SUBJECT = pa.struct(
    [
        ("id", pa.int32()),
        ("category", pa.string()),
        ("box", pa.list_(pa.float32())),  # normalised xyxy
        ("score", pa.float32()),
        ("reference", IMAGE),
        ("reference_dino", pa.float32()),
        ("mask", RLE),
        ("region", pa.string()),  # "mask" or "box": which one CLIP matched better to the category
        ("area", pa.float32()),  # fraction of the image covered by the chosen region
        ("verify_confidence", pa.float32()),  # verify's p(yes); null when the VLM could not read the crop
        ("mask_clip_margin", pa.float32()),  # layout: CLIP score of the mask view minus the box view's
    ]
)

# The working row every stage reads and writes; a stage fills the columns it owns.
WORK = pa.schema(
    [
        ("id", pa.string()),
        ("index", pa.int64()),
        ("source_id", pa.string()),
        ("num_subjects", pa.int32()),
        ("categories", pa.list_(pa.string())),
        ("caption", pa.string()),
        ("image", IMAGE),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("subjects", pa.list_(SUBJECT)),
        ("instruction", pa.string()),
        ("cot", pa.string()),  # JSON: {"subjects": [{id, role, placement}], "relations": [...]}
        ("layout", pa.list_(pa.int32())),
        ("layout_text", pa.string()),
        ("clip_embedding", pa.list_(pa.float32())),
    ]
)

DROPPED = pa.schema(
    [("id", pa.string()), ("index", pa.int64()), ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)

# A stage's scores table (`Stage(scores=...)`, `part-0000k.scores.parquet`): every candidate it scored
# against a threshold, kept or not, so a score's distribution is whole (`music calibrate`).
SCORES = pa.schema(
    [
        ("id", pa.string()),
        ("index", pa.int64()),
        ("stage", pa.string()),
        ("name", pa.string()),  # the score: a SUBJECT field name where it is one (reference_dino)
        ("subject", pa.int32()),  # the subject's id in the stage's input rows (null: a row's score)
        ("category", pa.string()),
        ("value", pa.float32()),
        ("passed", pa.bool_()),  # within the stage's thresholds for this score
    ]
)

# The published row before its quality scores (each stage declares its own: `Stage(published=...)`,
# assembled by `published_schema`), and the content hash that ends it.
PUBLISHED_BASE = [
    ("id", pa.string()),
    ("source_id", pa.string()),
    ("num_subjects", pa.int32()),
    ("image", IMAGE),
    ("caption", pa.string()),
    ("instruction", pa.string()),
    ("cot", pa.string()),
    ("layout", pa.list_(pa.int32())),
    ("layout_text", pa.string()),
    ("subject_ids", pa.list_(pa.int32())),
    ("categories", pa.list_(pa.string())),
    ("boxes", pa.list_(pa.list_(pa.float32()))),
    ("masks", pa.list_(RLE)),
    ("regions", pa.list_(pa.string())),
    ("references", pa.list_(IMAGE)),
]
# sha256 of the row's content, images by their bytes' sha256: a diff between releases reads no image.
CONTENT_HASH = ("content_hash", pa.string())

# `datasets` reads this from the Parquet metadata to decode `image` and `references` as images.
PUBLISHED_BASE_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "source_id": {"dtype": "string", "_type": "Value"},
    "num_subjects": {"dtype": "int32", "_type": "Value"},
    "image": {"_type": "Image"},
    "caption": {"dtype": "string", "_type": "Value"},
    "instruction": {"dtype": "string", "_type": "Value"},
    "cot": {"dtype": "string", "_type": "Value"},
    "layout": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "layout_text": {"dtype": "string", "_type": "Value"},
    "subject_ids": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"},
    "categories": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
    "boxes": {"feature": {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"}, "_type": "List"},
    "masks": {
        "feature": {"size": {"feature": {"dtype": "int32", "_type": "Value"}, "_type": "List"}, "counts": {"dtype": "string", "_type": "Value"}},
        "_type": "List",
    },
    "regions": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "List"},
    "references": {"feature": {"_type": "Image"}, "_type": "List"},
}
SCORE_TYPES = {"subject": (pa.list_(pa.float32()), {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"}),
               "sample": (pa.float32(), {"dtype": "float32", "_type": "Value"})}


def with_features(schema: pa.Schema, features: dict) -> pa.Schema:
    """`schema` carrying the Hugging Face features, so `datasets` decodes its images as images."""
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def published_schema(scores: list[tuple[str, str]]) -> pa.Schema:
    """The published schema with its quality-score columns, (name, per "subject" or "sample") in
    order, and its `datasets` features."""
    fields = [*PUBLISHED_BASE, *((name, SCORE_TYPES[per][0]) for name, per in scores), CONTENT_HASH]
    features = {**PUBLISHED_BASE_FEATURES, **{name: SCORE_TYPES[per][1] for name, per in scores},
                "content_hash": {"dtype": "string", "_type": "Value"}}
    return with_features(pa.schema(fields), features)
