"""The docs say what the code does: the configuration reference is what the models generate today,
the serving API's route table is the app's OpenAPI schema, the README's first screen is the two
commands, and every link between the pages leads to a file that exists."""

import re
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")


def test_the_configuration_reference_is_generated_from_the_current_models():
    render = runpy.run_path(str(REPO / "scripts" / "config_reference.py"))["render"]
    assert (DOCS / "configuration.md").read_text() == render(), (
        "docs/configuration.md is stale: run `python scripts/config_reference.py --write`")


def test_the_serving_api_routes_are_the_apps_openapi_routes():
    """The gateway's FastAPI app, with the routes `serving.app` binds, built without a cluster."""
    from cluster.contracts import EndpointSettings
    from serving.gateway import ENDPOINTS, Gateway, gateway_app

    app = gateway_app(EndpointSettings())
    for name, route in ENDPOINTS.items():
        route(app)(getattr(Gateway, name))
    served = {(method.upper(), path) for path, operations in app.openapi()["paths"].items() for method in operations}
    documented = set(re.findall(r"^\| `(GET|POST)` \| `(/[^`]*)` \|", (DOCS / "serving-api.md").read_text(), re.M))
    assert documented == served


def test_the_readmes_first_screen_is_the_two_commands():
    readme = (REPO / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:25])
    assert "make demo" in first_screen and "make test" in first_screen
    assert "make test-slow" in readme and "make bench" in readme
    assert len(readme.splitlines()) <= 120  # a page or two


def test_every_link_between_the_pages_leads_to_a_file():
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    broken = [f"{page.relative_to(REPO)} -> {target}" for page in pages for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert broken == []
