"""Data preprocessors: the GPU side of the input pipeline."""
from .gpu_image_preprocessor import TurboxDet3DDataPreprocessor

__all__ = ['TurboxDet3DDataPreprocessor']
