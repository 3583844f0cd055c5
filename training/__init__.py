"""Training and adapting CLIP encoders (clipsearch train): not built yet, see the open training issue."""
