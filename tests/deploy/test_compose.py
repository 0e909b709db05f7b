"""deploy/compose.yaml, checked without a Docker engine: against the Compose Specification's JSON
schema, and against the code it runs (commands, options, settings, ports, routes) and the files
it mounts (nginx, Prometheus, Grafana).

compose-spec.json is the Compose Specification's schema, vendored unchanged from
github.com/compose-spec/compose-spec, schema/compose-spec.json at commit
170098ba07d9f53c383a41bfd4c5166b0a4529a6 (the file last changed in a08f8d51631b); its $id is
compose_spec.json, draft-07."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import uvicorn
import yaml

from ordergate.gateway import ops
from ordergate.gateway.errors import PayloadTooLarge
from tests.deploy.deployfiles import (
    COMPOSE,
    DEPLOY,
    ROOT,
    SCHEMA,
    SECRETS,
    TEST_SECRET,
    Command,
    Directive,
    MissingVariable,
    compose,
    env_example,
    environment,
    gateway_routes,
    interpolate,
    is_ordergate,
    nginx,
    nginx_seconds,
    nginx_size,
    parse_command,
    raw_compose,
    variables,
)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return compose()


@pytest.fixture(scope="module")
def services(spec: dict[str, Any]) -> dict[str, Any]:
    return dict(spec["services"])


@pytest.fixture(scope="module")
def commands(services: dict[str, Any]) -> dict[str, Command]:
    """Each ordergate service's command, parsed, with the settings its environment gives."""
    return {
        name: parse_command(s["command"], environment(s))
        for name, s in services.items()
        if is_ordergate(s)
    }


def of(commands: dict[str, Command], command: str) -> dict[str, Command]:
    return {name: c for name, c in commands.items() if c.name == command}


@pytest.fixture(scope="module")
def conf() -> Directive:
    return nginx(DEPLOY / "nginx.conf")


def test_the_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    # Before interpolation (as written) and after (as compose runs it).
    for doc in (raw_compose(), compose()):
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_services_are_all_there(services: dict[str, Any], commands: dict[str, Command]) -> None:
    assert {"valkey", "postgres", "migrate", "proxy", "prometheus", "grafana", "locust"} <= set(
        services
    )
    assert len(of(commands, "serve")) == 2
    assert len(of(commands, "work")) == 2
    assert set(of(commands, "migrate")) == {"migrate"}
    assert set(commands) == set(of(commands, "serve")) | set(of(commands, "work")) | {"migrate"}


def test_every_file_it_builds_from_or_mounts_exists(services: dict[str, Any]) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is not None:
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT, name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing"


def test_every_ordergate_command_is_a_real_command_with_real_options(
    commands: dict[str, Command],
) -> None:
    # parse_command fails on an unknown command, option or ORDERGATE_* setting: here it is
    # enough that every service's command parsed.
    for name, c in of(commands, "serve").items():
        assert c.settings.host == "0.0.0.0", f"{name}: the proxy must reach it"
    for c in commands.values():
        assert c.settings.redis_url and c.settings.database_url, "no embedded servers here"
        assert c.settings.admin_token == TEST_SECRET
    # The whole deployment agrees on what Redis and Postgres hold.
    assert len({(c.settings.shards, c.settings.key_prefix) for c in commands.values()}) == 1
    assert len({(c.settings.redis_url, c.settings.database_url) for c in commands.values()}) == 1


def test_a_renamed_option_or_setting_fails_the_parse() -> None:
    env = {"ORDERGATE_REDIS_URL": "redis://valkey:6379/0"}
    for argv in (
        ["ordergate", "serve", "--hots", "0.0.0.0"],
        ["ordergate", "serve", "--proc", "2"],  # argparse alone would take the prefix
        ["ordergate", "server"],
        ["ordergate", "work", "--workers", "two"],
    ):
        with pytest.raises(AssertionError):
            parse_command(argv, env)
    with pytest.raises(AssertionError, match="ORDERGATE_WORKERS_METRICS_PORT"):
        parse_command(["ordergate", "work"], {**env, "ORDERGATE_WORKERS_METRICS_PORT": "1"})


def test_the_servers_are_the_compose_services(
    services: dict[str, Any], commands: dict[str, Command]
) -> None:
    settings = next(iter(commands.values())).settings
    redis = urlsplit(settings.redis_url or "")
    assert (redis.hostname, redis.port, redis.password) == ("valkey", 6379, TEST_SECRET)
    pg = urlsplit(settings.database_url or "")
    assert (pg.hostname, pg.port, pg.password) == ("postgres", 5432, TEST_SECRET)
    pg_env = environment(services["postgres"])
    assert (pg.username, pg.path) == (pg_env["POSTGRES_USER"], "/" + pg_env["POSTGRES_DB"])
    assert pg_env["POSTGRES_PASSWORD"] == TEST_SECRET
    assert services["valkey"]["command"][services["valkey"]["command"].index("--requirepass") + 1]


def test_valkey_keeps_what_it_acknowledged(
    services: dict[str, Any], commands: dict[str, Command]
) -> None:
    valkey = services["valkey"]
    assert valkey["image"].startswith("valkey/valkey:8")
    argv = valkey["command"]
    assert argv[0] == "valkey-server"
    options = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    # durability=auto sends no WAITAOF only under appendfsync always, and aof-always refuses
    # anything else: with either, a receipt means fsync'd (README: Durability).
    assert {c.settings.durability for c in commands.values()} <= {"auto", "aof-always"}
    assert options["--appendfsync"] == "always"
    assert options["--maxmemory"] not in ("0", "0b"), "memory_guard needs a maxmemory"
    assert options["--requirepass"] == TEST_SECRET
    assert environment(valkey)["REDISCLI_AUTH"] == TEST_SECRET  # for its healthcheck
    assert any(str(v).endswith(":/data") for v in valkey["volumes"])
    assert "valkey-cli ping" in " ".join(valkey["healthcheck"]["test"])


def test_postgres_keeps_its_data_where_the_18_image_does(services: dict[str, Any]) -> None:
    pg = services["postgres"]
    assert pg["image"] == "postgres:18"
    assert any(str(v).endswith(":/var/lib/postgresql") for v in pg["volumes"])
    assert "pg_isready" in pg["healthcheck"]["test"]


def test_migrate_runs_once_before_the_gateways_and_workers(
    services: dict[str, Any], commands: dict[str, Command]
) -> None:
    migrate = services["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["healthcheck"] == {"disable": True}
    assert migrate["depends_on"]["valkey"]["condition"] == "service_healthy"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in set(commands) - {"migrate"}:
        condition = services[name]["depends_on"]["migrate"]["condition"]
        assert condition == "service_completed_successfully", name


def test_credentials_have_no_defaults_and_env_example_names_every_variable() -> None:
    text = COMPOSE.read_text()
    used = variables(text)
    example = env_example()
    for name, op, _ in used:
        assert name in example, f"deploy/env.example does not name {name}"
        if re.search("PASSWORD|TOKEN|SECRET", name):
            assert op == ":?", f"${{{name}{op}...}}: a credential must be required, not defaulted"
    for name in SECRETS:
        assert name in {n for n, _, _ in used}, name
        assert example[name] == "", f"env.example must leave {name} empty: no shared default"
        # As shipped, compose refuses to start until each one is filled in.
        with pytest.raises(MissingVariable, match=name):
            compose({**example, **{s: TEST_SECRET for s in SECRETS if s != name}})
    # No literal credential anywhere: every secret-looking value comes from a variable.
    for line in text.splitlines():
        m = re.match(r"\s*-?\s*([A-Z_]*(?:PASSWORD|TOKEN|SECRET|_AUTH))\s*[:=]\s*(.+)", line)
        if m:
            assert "${" in m[2], line


def test_the_interpolation_reads_compose_s_forms() -> None:
    env = {"A": "x", "E": ""}
    assert interpolate("$$A ${A} $A ${B:-d} ${E:-d} ${E-d} ${A:+y} ${B+y}", env) == "$A x x d d  y "
    with pytest.raises(MissingVariable):
        interpolate("${E:?needed}", env)
    assert interpolate("${E?needed}", env) == ""


def test_only_the_proxy_grafana_and_locust_reach_the_host(services: dict[str, Any]) -> None:
    published = {name for name, s in services.items() if s.get("ports")}
    assert published == {"proxy", "grafana", "locust"}
    for name, s in services.items():
        assert s.get("network_mode") != "host", name
        for port in s.get("ports", []):
            if not (name == "proxy" and str(port).startswith("8080:")):
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port} beyond loopback"


def _listen(server: Directive) -> int:
    return int(server.one("listen").args[0])


def _servers(conf: Directive) -> dict[int, Directive]:
    return {_listen(s): s for s in conf.one("http").all("server")}


def _upstreams(conf: Directive) -> dict[str, set[str]]:
    return {
        u.args[0]: {" ".join(s.args) for s in u.all("server")}
        for u in conf.one("http").all("upstream")
    }


def _proxied(server: Directive) -> set[str]:
    return {d.args[0].removeprefix("http://") for d in server.walk() if d.name == "proxy_pass"}


def test_the_proxy_sends_customers_to_the_gateways_api_and_operators_to_their_port(
    services: dict[str, Any], commands: dict[str, Command], conf: Directive
) -> None:
    gateways = of(commands, "serve")
    upstreams = _upstreams(conf)
    servers = _servers(conf)
    published = {int(str(p).rsplit(":", 1)[1]): str(p) for p in services["proxy"]["ports"]}
    assert set(servers) == set(published)
    public, operators = (s for p, s in sorted(servers.items()))
    assert published[_listen(operators)].startswith("127.0.0.1:")

    (api,) = _proxied(public)
    assert upstreams[api] == {f"{n}:{c.settings.port}" for n, c in gateways.items()}
    (ops_upstream,) = _proxied(operators)
    assert upstreams[ops_upstream] == {f"{n}:{c.settings.ops_port}" for n, c in gateways.items()}
    assert all(c.settings.ops_port for c in gateways.values())
    for name in gateways:
        assert services["proxy"]["depends_on"][name]["condition"] == "service_healthy"
        assert "healthcheck" not in services[name], f"{name} keeps the image's HEALTHCHECK"
    check = " ".join(services["proxy"]["healthcheck"]["test"])
    m = re.search(rf"http://127\.0\.0\.1:{_listen(public)}(/\S*)", check)
    assert m and "GET" in gateway_routes().get(m[1], set()), check


def test_the_proxys_limits_are_the_gateways(commands: dict[str, Command], conf: Directive) -> None:
    http = conf.one("http")
    (settings,) = {c.settings for c in of(commands, "serve").values()}
    assert nginx_size(http.one("client_max_body_size").args[0]) == settings.max_body_bytes
    assert nginx_seconds(http.one("client_header_timeout").args[0]) == settings.header_timeout_s
    assert nginx_seconds(http.one("client_body_timeout").args[0]) == settings.body_timeout_s
    count, size = http.one("large_client_header_buffers").args
    assert nginx_size(size) >= settings.max_header_bytes
    public, operators = (s for _, s in sorted(_servers(conf).items()))
    assert nginx_size(operators.one("client_max_body_size").args[0]) == ops.MAX_COMMAND_BYTES
    # nginx's own 413 is the gateway's problem document.
    (page,) = public.one("error_page").args[1:]
    (named,) = [loc for loc in public.all("location") if loc.args == [page]]
    status, body = named.one("return").args
    problem = json.loads(body)
    assert (status, problem["status"]) == ("413", 413)
    assert problem["type"] == f"/problems/{PayloadTooLarge.type}"
    assert problem["title"] == PayloadTooLarge.title
    assert str(settings.max_body_bytes) in problem["detail"]
    assert named.one("default_type").args == ["application/problem+json"]
    # Event streams: unbuffered, and a read timeout longer than the gateway's 15 s keep-alive.
    (events,) = [loc for loc in public.all("location") if "events" in " ".join(loc.args)]
    assert events.one("proxy_buffering").args == ["off"]
    assert nginx_seconds(events.one("proxy_read_timeout").args[0]) > 15
    assert re.fullmatch(events.args[1], "/v1/queue/abc.1.0/events")


def test_forwarded_headers_are_set_by_the_proxy_and_trusted_by_the_gateways(
    services: dict[str, Any], commands: dict[str, Command], conf: Directive, monkeypatch: Any
) -> None:
    headers = {d.args[0].lower(): d.args[1] for d in conf.one("http").all("proxy_set_header")}
    assert headers["host"] == "$http_host"  # receipts' URLs and the drain's same-origin check
    assert headers["x-forwarded-proto"] == "$scheme"
    assert headers["x-forwarded-for"] == "$remote_addr"  # overwritten: a client's is dropped
    trusted = {environment(services[n]).get("FORWARDED_ALLOW_IPS") for n in of(commands, "serve")}
    assert trusted == {"*"}
    # uvicorn (ordergate serve's server) reads that variable when ordergate gives no value.
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    config = uvicorn.Config("ordergate.components:gateway_app", factory=True)
    assert config.proxy_headers and config.forwarded_allow_ips == "*"


def test_prometheus_scrapes_every_gateway_and_worker_where_they_serve_metrics(
    services: dict[str, Any], commands: dict[str, Command]
) -> None:
    prometheus = services["prometheus"]
    (mount,) = [
        v for v in prometheus["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro")
    ]
    config = yaml.safe_load((DEPLOY / mount.split(":")[0]).read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    scraped: dict[str, dict[str, Any]] = {}
    for job in jobs.values():
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            host, port = target.rsplit(":", 1)
            assert host in services, f"{target}: no such service"
            assert host not in scraped, f"{host} scraped twice"
            scraped[host] = {"port": int(port), "job": job}
    expected = {n: c.settings.ops_port for n, c in of(commands, "serve").items()}
    expected |= {n: c.settings.worker_metrics_port for n, c in of(commands, "work").items()}
    assert {h: s["port"] for h, s in scraped.items()} == expected
    for name, c in of(commands, "work").items():
        assert c.settings.worker_metrics_port and c.settings.host == "0.0.0.0", name
    # The gateways' /metrics asks for the admin token: Prometheus reads it from a secret
    # made of the very variable the gateways' token comes from.
    for name in of(commands, "serve"):
        credentials = scraped[name]["job"]["authorization"]["credentials_file"]
        secret = Path(credentials).name
        assert credentials == f"/run/secrets/{secret}" and secret in prometheus["secrets"]
        source = compose()["secrets"][secret]["environment"]
        assert environment(raw_compose()["services"][name])["ORDERGATE_ADMIN_TOKEN"] == (
            f"${{{source}:?set {source} in deploy/.env}}"
        )


def test_worker_healthchecks_ask_their_own_metrics_port(
    services: dict[str, Any], commands: dict[str, Command]
) -> None:
    for name, c in of(commands, "work").items():
        check = " ".join(services[name]["healthcheck"]["test"])
        m = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", check)
        assert m, check
        assert (int(m[1]), m[2]) == (c.settings.worker_metrics_port, "/metrics")


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus(
    services: dict[str, Any],
) -> None:
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    (dashboard_target,) = [t for t, src in mounts.items() if src.name == "ordergate.json"]
    assert mounts[dashboard_target].resolve() == DEPLOY / "grafana" / "ordergate.json"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "ordergate.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == str(Path(dashboard_target).parent)
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    dashboard = json.loads(mounts[dashboard_target].read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == source["type"]  # the selector finds the provisioned source
    assert environment(grafana)["GF_SECURITY_ADMIN_PASSWORD"] == TEST_SECRET


def test_locust_runs_the_locustfile_against_the_proxy_only_when_asked(
    services: dict[str, Any], conf: Directive
) -> None:
    locust = services["locust"]
    assert locust["profiles"] == ["load"]
    argv = locust["command"]
    (mount,) = locust["volumes"]
    source, target = mount.split(":")[:2]
    locustfile = argv[argv.index("-f") + 1]
    assert locustfile.startswith(target + "/")
    path = (DEPLOY / source / locustfile.removeprefix(target + "/")).resolve()
    assert path == ROOT / "loadtests" / "locustfile.py"
    host = urlsplit(argv[argv.index("--host") + 1])
    assert host.hostname == "proxy"
    public = min(_servers(conf))
    assert host.port == public
    assert "ORDERGATE_API_KEY" in environment(locust)
