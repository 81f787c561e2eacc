"""Medical image IO: readers, writers and grid geometry with one metadata contract (:class:`ImageMeta`).

Every reader returns a channel-first array (C, X, Y, Z) and an :class:`ImageMeta` whose world coordinates
are RAS+ millimetres (the NIfTI/MONAI convention), whatever the file's own convention (DICOM, ITK and NRRD
are LPS). Every error is a ``ValueError`` naming the file or series and what is wrong with it.
"""

from medmeta_plugin.io.dicom import read_dicom_series
from medmeta_plugin.io.dicom_writer import write_dicom_series
from medmeta_plugin.io.geometry import check_label_geometry, resample
from medmeta_plugin.io.headers import DeclaredSize, declared_size
from medmeta_plugin.io.meta import ImageMeta
from medmeta_plugin.io.readers import read_image, read_label
from medmeta_plugin.io.writers import write_image

__all__ = [
    "DeclaredSize",
    "ImageMeta",
    "check_label_geometry",
    "declared_size",
    "read_dicom_series",
    "read_image",
    "read_label",
    "resample",
    "write_dicom_series",
    "write_image",
]
