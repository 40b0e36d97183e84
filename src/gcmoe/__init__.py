"""gcmoe: predict single-cell gene expression from H&E slides.

Importing the package is light: torch and the other heavy libraries load only when a function that needs
them runs.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
