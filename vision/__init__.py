"""mmskip.vision: multimodal adapters (p-MoD / VideoLLM-MoD vision-token skipping, MuE early exits).

Not built yet: no technique lives here so far (see the README's status table).
"""
