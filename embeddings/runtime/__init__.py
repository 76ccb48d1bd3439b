"""The CLIP runtime (knows nothing of HTTP): prepare a model, open its engine, embed images and texts."""
