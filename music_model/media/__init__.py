"""Media: images as Hugging Face `Image` structs, crops and labelled overlays (`images`), masks as
COCO run-length encodings (`masks`), and the DreamBench protocol's image preprocessing
(`preprocess`). The leaves of `music_model`: they import nothing from the project."""
