"""Single-file diffusers pipelines, for students no stock pipeline can run (DESIGN.md §1). Each file imports only
diffusers and torch; an export copies it into the folder, loaded with ``trust_remote_code=True``."""
