"""Small networks that are not diffusers backbones."""
