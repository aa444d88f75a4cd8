"""prefect.yaml: every deployment points at a real flow, has a work pool, and carries no secrets."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml
from prefect import Flow

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_is_a_flow() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    names = [d["name"] for d in spec["deployments"]]
    assert {"pipeline", "pretrain", "data"} <= set(names) and len(names) == len(set(names))
    for deployment in spec["deployments"]:
        path, attr = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, attr), Flow), deployment["entrypoint"]
        assert deployment["work_pool"]["name"] == "lmforge-process"


def test_no_secrets_or_hard_coded_ids() -> None:
    text = (ROOT / "prefect.yaml").read_text()
    assert not re.search(r"(?i)(secret|password|aws_access_key|token:)", text)
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", text)
