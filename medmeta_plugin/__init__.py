"""medmeta: a meta-learned shared 3D backbone with per-task adapters, for MONAI Label.

The model is F(x) = A(B(x; phi)): a backbone B shared by every task and a small adapter A per task.
Sub-packages, one concern each, lowest floor first (a module imports only from its own floor or below;
``tests/test_layers.py`` enforces it):

- ``names``, ``paths``, ``atomic``, ``caching``, ``transforms``: shared helpers (structure names, the
  package's data paths, atomic writes, bounded caches, intensity normalisation);
- ``io``            medical image readers/writers (NIfTI, NRRD, MetaImage, DICOM) and geometry;
- ``registration``  global placement with its confidence, then rigid/affine/B-spline registration (ITK);
- ``networks``      the backbone, adapters, heads and the composed model;
- ``episodes``      tasks, phantoms, real cases and the few-shot episode sampler; the held-out split;
- ``adapt``         adaptation of a task's adapter from a few labels, the carried (atlas) prior, the store;
- ``meta``          meta-training of the shared backbone;
- ``app``           the MONAI Label app's parts: infer and train tasks, strategies, serving, routes;
- ``benchmarks``    the ``medmeta benchmark`` suites;
- ``stack``         the clinical stack (Orthanc, OHIF in Chromium);
- ``cli``           the ``medmeta`` command.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
