"""Arrow schemas of the stage shards, the dropped tables and the published dataset."""
from __future__ import annotations

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

PUBLISHED = pa.schema(
    [
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
        # Quality scores, per subject (aligned with subject_ids) and per sample: the card says what each means.
        ("detector_scores", pa.list_(pa.float32())),
        ("verify_confidences", pa.list_(pa.float32())),
        ("reference_dino", pa.list_(pa.float32())),
        ("mask_clip_margins", pa.list_(pa.float32())),
        ("near_duplicate_clip", pa.float32()),
        # sha256 of the row's content, images by their bytes' sha256: a diff between releases reads no image.
        ("content_hash", pa.string()),
    ]
)
SCORE_COLUMNS = ("detector_scores", "verify_confidences", "reference_dino", "mask_clip_margins", "near_duplicate_clip")

# `datasets` reads this from the Parquet metadata to decode `image` and `references` as images.
PUBLISHED_FEATURES = {
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
    **{name: {"feature": {"dtype": "float32", "_type": "Value"}, "_type": "List"}
       for name in ("detector_scores", "verify_confidences", "reference_dino", "mask_clip_margins")},
    "near_duplicate_clip": {"dtype": "float32", "_type": "Value"},
    "content_hash": {"dtype": "string", "_type": "Value"},
}
