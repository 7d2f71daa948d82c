"""Subjects of a sample: the 8x8 layout grid a subject's region is projected onto (`layout`),
decimation to fewer subjects with `<sN>` renumbering (`decimate`), and the preview sheets that
show a sample's subjects for a person to judge (`preview`), category names as English nouns in
the singular and plural (`nouns`). Pure math over boxes, masks and text:
no model is loaded here. May import `media`; `music` and the build stages use it."""
