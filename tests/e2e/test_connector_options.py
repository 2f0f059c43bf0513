"""Endpoint options come from each connector's ``config_type`` (issue 13).

A small third-party connector is installed for the test the way any package would register
one: a distribution's ``entry_points.txt`` under ``aggregator.connectors``, found on the path.
It then gets its own ``endpoint add`` options, validation and JSON Schema without any change
to the core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aggregator.connector_options import cli_options, config_from_options, endpoint_kinds, fields_of, json_schema
from aggregator.errors import UsageError
from connectors.dimse import DimseConfig

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("aggregator")

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass
    from typing import Any
    from connectors.base import CheckResult, Connector, ConnectorConfig, option

    @dataclass
    class GopherConfig(ConnectorConfig):
        server: str = option(help="Gopher server host.")
        selector_depth: int = option(3, help="How deep to follow menus.")
        flavour: str = option("plain", help="Menu flavour.", choices=("plain", "plus"))
        hidden: list[str] | None = option(None, help="internal", cli=False)

    class GopherConnector(Connector):
        kind = "gopher"
        config_type = GopherConfig

        def check(self) -> CheckResult:
            return CheckResult(ok=True, details={"server": self.config.server})

        def pull(self, patient: Any, since: Any, sink: Any, progress: Any) -> dict[str, Any]:
            return {}
''')


@pytest.fixture()
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "gopher_connector.py").write_text(PLUGIN)
    dist = site / "gopher_connector-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gopher-connector\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[aggregator.connectors]\ngopher = gopher_connector:GopherConnector\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def _run(home: Path, site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "PYTHONPATH": str(site)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


def test_a_third_party_connector_gets_cli_options_and_validation(plugin_path: Path, tmp_path: Path) -> None:
    if not EXE.exists():
        pytest.skip("console script not installed")
    home = tmp_path / "home"
    shown = _run(home, plugin_path, "endpoint", "add", "--help")
    assert "--selector-depth" in shown.stdout and "[gopher]" in shown.stdout and "--hidden" not in shown.stdout
    r = _run(home, plugin_path, "endpoint", "add", "g1", "--kind", "gopher", "--server", "gopher.example",
             "--selector-depth", "5", "--flavour", "plus", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"] == {"server": "gopher.example", "selector_depth": 5, "flavour": "plus",
                                              "hidden": None}
    bad = _run(home, plugin_path, "endpoint", "add", "g2", "--kind", "gopher", "--server", "x", "--flavour", "fancy")
    assert bad.returncode == 2 and "'fancy' is not one of 'plain', 'plus'" in bad.stderr
    foreign = _run(home, plugin_path, "endpoint", "add", "g3", "--kind", "gopher", "--server", "x",
                   "--called-ae", "PACS")
    assert foreign.returncode == 2 and "--called-ae do not apply to kind 'gopher'" in foreign.stderr
    typed = _run(home, plugin_path, "endpoint", "add", "g4", "--kind", "gopher", "--option", "selector_depth=7",
                 "--server", "x", "--json")
    assert typed.returncode == 0, typed.stderr
    assert json.loads(typed.stdout)["config"]["selector_depth"] == 7


def test_the_plugin_has_a_json_schema_for_the_api(plugin_path: Path) -> None:
    kinds = endpoint_kinds()
    assert {"fhir", "fhir-bulk", "dimse", "dicomweb", "gopher"} <= set(kinds) and "media" not in kinds
    schema = json_schema("gopher", kinds["gopher"])
    assert schema["required"] == ["server"]
    assert schema["properties"]["flavour"] == {"type": "string", "description": "Menu flavour.",
                                               "enum": ["plain", "plus"], "default": "plain"}
    assert schema["properties"]["selector_depth"]["type"] == "integer"
    assert "hidden" not in schema["properties"] and schema["additionalProperties"] is False


def test_builtin_options_keep_their_names() -> None:
    """The options users' scripts pass today are all still there."""
    flags = {o.flag for o in cli_options(endpoint_kinds())}
    before = {"--url", "--auth", "--token-env", "--token-file", "--client-id", "--client-id-env",
              "--client-secret-env", "--client-secret-file", "--private-key", "--kid", "--alg", "--token-url",
              "--scope", "--strategy", "--page-size", "--concurrency", "--rps", "--timeout", "--group-id",
              "--types", "--host", "--port", "--called-ae", "--calling-ae", "--retrieve", "--move-ae",
              "--store-port", "--store-host", "--username", "--password-env", "--password-file", "--modalities",
              "--date-from", "--date-to"}
    assert before <= flags


def test_timeout_alias_sets_both_dimse_timeouts_and_values_are_typed() -> None:
    specs = fields_of(DimseConfig)
    config = config_from_options("dimse", specs, {"host": "h", "port": "104", "called_ae": "PACS", "timeout": "9"})
    assert config == {"host": "h", "port": 104, "called_ae": "PACS", "dimse_timeout": 9.0, "network_timeout": 9.0}
    with pytest.raises(UsageError, match="--port expects integer"):
        config_from_options("dimse", specs, {"port": "many"})
    with pytest.raises(UsageError, match="--retrieve must be one of get, move"):
        config_from_options("dimse", specs, {"retrieve": "steal"})
