"""Quality metrics: FID, CLIP score, fidelity, perplexity."""
