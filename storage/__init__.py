"""Image store and storage backends (local, block, object)."""
from storage.backend import Backend, BlobInfo, Usage, Volume, VolumeSpec

__all__ = ["Backend", "BlobInfo", "Usage", "Volume", "VolumeSpec"]
