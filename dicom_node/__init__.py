"""The DICOM node: receives breast MRI, assembles diffusion series, fits DKI, publishes features."""
