"""Image store and storage backends (local, block, object)."""
from storage.backend import Backend, BlobInfo, Usage, Volume, VolumeSpec
from storage.images import Image, ImageStore, RootfsLayers

__all__ = ["Backend", "BlobInfo", "Image", "ImageStore", "RootfsLayers", "Usage", "Volume",
           "VolumeSpec"]
