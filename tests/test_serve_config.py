"""configs/serve.yaml is a Serve config `serve deploy` accepts: Ray's own schema, our app's args."""

from __future__ import annotations

import yaml
from ray._common.utils import import_attr
from ray.serve.schema import ServeDeploySchema

from cluster.contracts import EndpointSettings
from tests.conftest import REPO

SERVE_CONFIG = REPO / "configs" / "serve.yaml"


def test_serve_config_matches_rays_schema_and_our_settings():
    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    assert schema.applications, "no application in the Serve config"
    for app in schema.applications:
        assert callable(import_attr(app.import_path)), app.import_path
        settings = EndpointSettings.model_validate(app.args)  # unknown or bad args fail here, not at deploy
        assert settings.model_dir, f"application {app.name} names no model_dir"
    assert "serve deploy configs/serve.yaml" in SERVE_CONFIG.read_text()
