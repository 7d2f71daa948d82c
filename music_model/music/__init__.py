"""The MUSIC model: the planner that writes the vision chain of thought and the 8x8 layout
(`plan`, `planner`), the renderer that paints from a layout canvas (`renderer`), their LoRA training
(`training`) and generation with N candidates per case (`model`). The top of `music_model`: it may
import every other subpackage, and none imports it."""
