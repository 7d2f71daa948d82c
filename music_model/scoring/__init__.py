"""Scoring any generator: DINO, CLIP-I and CLIP-T computed in batches with bootstrap intervals
(`metrics`), DreamBench as the field runs it (`dreambench`), multi-subject cases with UNO-style and
grounded scores (`multisubject`), and exact Pass@N curves (`passn`). May import `roles` (the
embedders and the detector), `media` and `subjects`; never `music`, which uses it to pick
candidates."""
