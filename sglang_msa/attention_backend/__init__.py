"""The `msa` attention backend (`backend.MSAAttnBackend`)."""
