"""The clinical stack for real: a local Orthanc PACS with DICOMweb, loaded with the sample studies as DICOM,
for the medmeta app and OHIF to work against (``make test-stack``)."""
