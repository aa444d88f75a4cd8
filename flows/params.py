"""Parameters shared by the flows: typed, so Prefect validates them and the UI renders a form."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from infra import storage
from infra.secrets import export_s3_credentials
from infra.settings import default_tracking_uri, get_settings, reject_password
from infra.tracking import FLOW_RUN_TAG, RunRef, open_tracker


class Where(BaseModel):
    model_config = ConfigDict(hide_input_in_errors=True)  # a rejected URL may carry a password: never echo it

    root: str | None = Field(None, description="where everything is written: a local path or s3://bucket/prefix "
                                                "(default: LMFORGE_ROOT, else ./.lmforge)")
    run_name: str | None = Field(None, description="directory under the root for this run (default: the preset); "
                                                    "the same name resumes and reuses finished stages")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: LMFORGE_TRACKING_URI, else "
                                                        "sqlite:///<root>/mlflow.db)")
    cold_root: str | None = Field(None, description="cold storage for training checkpoints, e.g. s3://bucket/prefix:"
                                                     " each one is uploaded as it is saved, under <cold_root>/"
                                                     "<run_name>/pretrain/<phase>/ and …/sft/train/ (for a local root "
                                                     "only: a remote root holds them itself)")

    @field_validator("root", "tracking_uri", "cold_root")
    @classmethod
    def _no_password(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Flow parameters are recorded by Prefect, and these URLs by MLflow and in files: credentials go elsewhere."""
        return None if value is None else reject_password(value, f"where.{info.field_name}")

    def workdir(self, preset: str) -> str:
        return storage.join(self.root or get_settings().root, self.run_name or preset)

    def cold(self, preset: str, *parts: str) -> str | None:
        """Where a training stage's checkpoints are mirrored (``parts``: its place in the run's layout), or None."""
        return None if self.cold_root is None else storage.join(self.cold_root, self.run_name or preset, *parts)

    def tracking(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        settings = get_settings()
        if self.root is None or settings.tracking_uri != default_tracking_uri(settings.root):
            return str(settings.tracking_uri)  # LMFORGE_TRACKING_URI, or the default beside LMFORGE_ROOT
        return default_tracking_uri(self.root)


@contextmanager
def parent_run(where: Where, run_name: str, tags: dict[str, str], given: RunRef | None = None) -> Iterator[RunRef]:
    """The MLflow parent run of one flow run, tagged with the Prefect flow-run id; ended FAILED if the flow raises.

    With ``given`` (a parent opened by an enclosing flow) that run is used and left for its owner to end. Every flow
    enters here first, so this is where a worker process takes its S3 keys from the Secret block, if one is named.
    """
    export_s3_credentials(get_settings().s3_secret_block)
    if given is not None:
        yield given
        return
    from prefect.runtime import flow_run

    tracker = open_tracker(where.tracking())
    ref = tracker.start_parent(run_name, {FLOW_RUN_TAG: str(flow_run.id or ""), **tags})
    try:
        yield ref
    except BaseException:
        tracker.end(ref, "FAILED")
        raise
    tracker.end(ref, "FINISHED")
