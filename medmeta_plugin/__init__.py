"""medmeta: a meta-learned shared 3D backbone with per-task adapters, for MONAI Label.

The model is F(x) = A(B(x; phi)): a backbone B shared by every task and a small adapter A per task.
Sub-packages, one concern each:

- ``networks``  the backbone, adapters, heads and the composed model;
- ``io``        medical image readers/writers and geometry;
- ``episodes``  tasks, synthetic phantoms and the few-shot episode sampler;
- ``cli``       the ``medmeta`` command.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
