"""The medmeta MONAI Label app: meta-learned infer and train tasks, label-driven adaptation, active learning.

Start it with ``medmeta serve --studies DIR`` or
``python -m monailabel.main start_server --app apps/medmeta --studies DIR [--conf key value ...]``;
the keys are those of :class:`medmeta_plugin.app.config.AppConfig` (all optional).

This file only wires MONAI Label's hooks to :mod:`medmeta_plugin.app`; the class must subclass
``MONAILabelApp`` directly, because that is how MONAI Label finds it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

import medmeta_plugin
from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.datastore import MedMetaDatastore
from medmeta_plugin.app.dicomweb import MedMetaDICOMWebDatastore
from medmeta_plugin.app.infer_task import SegmentationInfer, VolumeInfer
from medmeta_plugin.app.routes import install_guards
from medmeta_plugin.app.runtime import MedMetaRuntime
from medmeta_plugin.app.strategy import DiversityStrategy, UncertaintyScoring, UncertaintyStrategy
from medmeta_plugin.app.train_task import AdaptTrain, MetaTrain
from medmeta_plugin.paths import META_RECIPE, checkout

logger = logging.getLogger(__name__)

# MONAI Label's train process reads PYTHONPATH unconditionally (a KeyError leaves a task SUBMITTED for
# ever) and needs this package importable (a checkout's folder; an installed copy already is); tracking
# through MLflow 3 fails on its default file store.
os.environ.setdefault("PYTHONPATH", str(checkout() or ""))
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")


class MedMetaApp(MONAILabelApp):
    """One meta-learned backbone; one adapter per structure, adapted from the labels users submit."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.config = parse_conf(conf)
        self.model_dir = Path(app_dir) / "model"
        self.runtime: MedMetaRuntime | None = None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medmeta",
            description="Few-shot segmentation, classification and regression on a meta-learned 3D backbone",
            version=medmeta_plugin.__version__,
        )
        # Scores are refreshed in-process by the adaptation worker; MONAI Label's own auto-scoring would start
        # a process that rebuilds the whole app after every request.
        self._auto_update_scoring = False

    # ----- MONAI Label's init hooks (called by MONAILabelApp.__init__, in this order) -----------------------
    def init_datastore(self) -> Any:
        if self.studies.startswith(("http://", "https://")):
            datastore = self._dicomweb_datastore()
        else:
            datastore = MedMetaDatastore(
                self.studies,
                fallback_labels=self.config.label_map,
                max_revisions=self.config.max_revisions,
                limits=(self.config.spacing, self.config.max_voxels),
                extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            )
        self.runtime = MedMetaRuntime(self.config, self.model_dir, datastore)
        return datastore

    def _download_dcmqi_tools(self) -> None:
        # MONAI Label fetches dcmqi from GitHub whenever the studies are DICOMweb; there is no network at run
        # time, and a failed download stops the server. DICOM SEG is written with pydicom-seg instead.
        logger.info("medmeta: not downloading dcmqi (no network at run time); DICOM SEG via pydicom-seg")

    def _dicomweb_datastore(self) -> Any:
        """MONAI Label's DICOMweb datastore settings, with the app's datastore class (see its module)."""
        from monailabel.datastore.dicom import DICOMwebClientX

        self.studies = self.studies.rstrip("/").strip()
        client = DICOMwebClientX(
            url=self.studies,
            session=None,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        return MedMetaDICOMWebDatastore(
            fallback_labels=self.config.label_map,
            max_revisions=self.config.max_revisions,
            client=client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache or None,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {"medmeta": SegmentationInfer(self.runtime), "medmeta_volume": VolumeInfer(self.runtime)}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {
            "medmeta_adapt": AdaptTrain(self.runtime),
            "medmeta_metatrain": MetaTrain(self.runtime, META_RECIPE),
        }

    def init_strategies(self) -> dict[str, Strategy]:
        return {
            "medmeta_uncertainty": UncertaintyStrategy(self.runtime),
            "medmeta_diversity": DiversityStrategy(self.runtime),
            "random": Random(),
        }

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        return {"medmeta_uncertainty": UncertaintyScoring(self.runtime)}

    # ----- server hooks ------------------------------------------------------------------------------------
    def on_init_complete(self) -> None:
        super().on_init_complete()
        from monailabel.app import app as fastapi_app  # the server process only (not the train process)

        install_guards(fastapi_app)
        scheduled = self.runtime.start()
        if scheduled:
            logger.info("medmeta: adapting %s from labels already in the datastore", scheduled)

    def on_save_label(self, image_id: str, label_id: str) -> dict[str, Any]:
        super().on_save_label(image_id, label_id)
        tags = getattr(self.datastore(), "saved_tags", None)
        scheduled = self.runtime.on_label_saved(image_id, tags.take(image_id) if tags else "final")
        return {"medmeta": {"adapting": scheduled}}

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["medmeta"] = self.runtime.status()
        return meta

    # ----- client errors are 4xx with a message, not MONAI Label's 500 -------------------------------------
    def infer(self, request: dict[str, Any], datastore: Any = None) -> dict[str, Any]:
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"unknown model {model!r}; models: {sorted(self._infers)}.")
        image = request.get("image")
        store = datastore or self.datastore()
        if isinstance(image, str) and not store.get_image_uri(image) and not self._served_file(image):
            # A path is served only when the server itself put it there (an uploaded file or a session's
            # scan), never because a client named it: `image=/etc/...` must not read the server's disk.
            raise HTTPException(404, f"image {image!r} is not in the datastore.")
        return super().infer(request, datastore)

    def _served_file(self, path: str) -> bool:
        """True for a file of an infer upload (MONAI Label's temporary file) or of a session."""
        if not os.path.isfile(path):
            return False
        real = Path(os.path.realpath(path))
        upload = real.parent == Path(os.path.realpath(tempfile.gettempdir())) and real.name.startswith("tmp")
        sessions = getattr(self._sessions, "store_path", None)
        session = bool(sessions) and real.is_relative_to(os.path.realpath(sessions))
        return upload or session

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            valid = sorted(self._strategies)
            raise HTTPException(404, f"unknown strategy {strategy!r}; strategies: {valid}.")
        return super().next_sample(request)
