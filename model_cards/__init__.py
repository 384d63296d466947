"""Hub model card templates, shipped as package data of ``pixel_diffusers.model_cards``."""
