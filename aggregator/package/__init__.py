"""The consultant package: writer and verifier.

``write_package`` turns a normalized record, its gap report and the blob store into a folder
(or zip) with a clinical summary, a FHIR document Bundle, the original documents, the DICOM
images with a DICOMDIR (IHE PDI), XDM metadata and a SHA-256 manifest; ``verify_package``
checks such a package against its manifest.
"""

from aggregator.package.verify import verify_package
from aggregator.package.writer import write_package

__all__ = ["verify_package", "write_package"]
