"""The imagery layer: reading rasters, choosing bands, spectral indices and map coordinates.

It knows no neural network: it turns a file (GeoTIFF/COG of any dtype and band count, PNG, JPEG,
bytes, a PIL image or a numpy array) into an 8-bit RGB view for display and the model, a validity
mask, JSON facts for the prompt, and the geometry needed to put pixel boxes on a map.
"""

from geochat.imagery.bands import SENSOR_PRESETS, BandSelection, SensorPreset, SpectralBand, select_bands
from geochat.imagery.geo import (
    map_to_pixel,
    pixel_to_lonlat,
    pixel_to_map,
    polygons_to_geojson,
)
from geochat.imagery.indices import INDICES, compute_index, normalized_difference, spectral_facts
from geochat.imagery.raster import LoadedImage, RasterInfo, load_image, pad_to_square, read_info, read_window
from geochat.imagery.stretch import Stretch

__all__ = [
    "INDICES",
    "SENSOR_PRESETS",
    "BandSelection",
    "LoadedImage",
    "RasterInfo",
    "SensorPreset",
    "SpectralBand",
    "Stretch",
    "compute_index",
    "load_image",
    "map_to_pixel",
    "normalized_difference",
    "pad_to_square",
    "pixel_to_lonlat",
    "pixel_to_map",
    "polygons_to_geojson",
    "read_info",
    "read_window",
    "select_bands",
    "spectral_facts",
]
