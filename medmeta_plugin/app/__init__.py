"""The MONAI Label glue: the app's config, datastore, model runtime, adaptation worker, infer tasks, train
tasks and active-learning strategies. The app class itself is ``apps/medmeta/main.py``.

Modules, in the order a request meets them: ``config`` (``--conf`` parsing), ``datastore`` (studies folder,
label validation), ``labels`` (what a submitted label means), ``grid`` (the working grid), ``engine``
(composes ``serving``: the backbone and adapters served; ``segmenting``: a scan's masks and how each was
found; ``adapting``: labelled examples to a served adapter), ``worker`` (background adaptation), ``runtime``
(ties them together), ``infer_task``, ``train_task``, ``strategy``; ``features`` (the backbone pass and its
cache), ``priors`` (atlas priors), ``routes`` (guard routes), ``dicomweb`` (the DICOMweb datastore), ``demo``.
"""
