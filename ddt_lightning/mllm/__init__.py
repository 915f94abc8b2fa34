"""DDT-LLaMA: the multimodal causal LM over text tokens and DDT visual codes (design.md, section 2)."""
