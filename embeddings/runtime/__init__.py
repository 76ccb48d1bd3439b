"""The CLIP runtime: loading a model, encoding images and texts, batching. Knows nothing of HTTP."""
