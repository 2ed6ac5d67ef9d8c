"""deploy/: the systemd units, the container files and the Kubernetes manifests hold up.

No service manager or container engine runs here: the files must parse, name settings
`durable` accepts, call only commands the CLI has, and give shutdown more time than the
grace period. `systemd-analyze verify` runs when it is installed.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from durable.cli import build_parser
from durable.settings import Settings, parse_duration, unknown_variables
from tests.support.helpers import ROOT

DEPLOY = ROOT / "deploy"
UNITS = [DEPLOY / "systemd" / "durable.service", DEPLOY / "systemd" / "durable@.service"]
ENV_EXAMPLE = DEPLOY / "durable.env.example"
DEFAULT_GRACE = Settings().shutdown_grace
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "CapabilityBoundingSet": "",
}


# -- helpers ------------------------------------------------------------------------------


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= and docker's --env-file read them."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def yaml_documents(path: Path) -> list[Any]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def manifests() -> dict[str, dict[str, Any]]:
    """Kubernetes objects under deploy/kubernetes by kind (one of each)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml_documents(path):
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    return out


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(text: str) -> list[str]:
    """The argv of a Dockerfile JSON (exec) form such as ["durable", "run"]."""
    argv = yaml.safe_load(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def healthcheck_argv(rest: str) -> list[str]:
    _options, _, command = rest.partition("CMD ")
    return exec_form(command)


def container_commands(doc: dict[str, Any]) -> list[list[str]]:
    spec = doc["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    return [c["command"] + c.get("args", []) for c in containers]


def structured_commands() -> list[list[str]]:
    """Every command deploy/ runs: unit ExecStart, Dockerfile, compose, Kubernetes."""
    commands = [shlex.split(unit(p)["Service"]["ExecStart"]) for p in UNITS]
    for word, rest in dockerfile_instructions(DEPLOY / "container" / "Dockerfile"):
        if word == "CMD":
            commands.append(exec_form(rest))
        elif word == "HEALTHCHECK":
            commands.append(healthcheck_argv(rest))
    compose = yaml_documents(DEPLOY / "container" / "compose.yaml")[0]
    commands += [s["command"] for s in compose["services"].values() if "command" in s]
    for kind in ("Deployment", "Job"):
        commands += container_commands(manifests()[kind])
    return commands


_AT_START = re.compile(r"(?:\S*/)?durable\s+(?!durable\b)(.*)")  # durable ... or /x/bin/durable ...
# docker compose exec SERVICE durable ...
_AFTER_EXEC = re.compile(r"\bexec\s+\S+\s+durable\s+(.*)")
_ARGV = re.compile(r'\[\s*"durable"(?:\s*,\s*"[^"]*")+\s*\]')  # ["durable", "check"]


def documented_commands() -> list[list[str]]:
    """`durable ...` commands shown in deploy/: code in comments and docstrings (indented),
    the README's code blocks, and exec-form lists anywhere."""
    found = []
    files = (p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in sorted(files):
        fenced = False
        for line in path.read_text().splitlines():
            found += [exec_form(m.group(0)) for m in _ARGV.finditer(line)]
            if path.suffix == ".md":
                if line.strip().startswith("```"):
                    fenced = not fenced
                    continue
                if not fenced:
                    continue
            elif not re.match(r"\s*#\s{3}|\s{4}", line):
                continue  # prose; commands are indented
            code = re.sub(r"^\s*#?\s*", "", line)
            m = _AT_START.match(code) or _AFTER_EXEC.search(code)
            if m is not None:
                found.append(["durable", *shlex.split(m.group(1).rstrip("\\"), comments=True)])
    return found


def cli_accepts(argv: list[str]) -> None:
    assert Path(argv[0]).name == "durable", argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(argv)}` is not a valid durable command: {err.getvalue()}")


# -- every command exists --------------------------------------------------------------------


def test_every_command_in_deploy_is_a_valid_durable_command() -> None:
    structured, documented = structured_commands(), documented_commands()
    assert {a[1] for a in structured} == {"run", "check", "migrate"}
    assert {"migrate", "start", "workers"} <= {a[1] for a in documented}
    for argv in structured + documented:
        cli_accepts(argv)
    # ... and each subcommand really runs: `durable SUB --help` exits 0.
    subcommands = sorted({a[1] for a in structured + documented})
    procs = {
        sub: subprocess.Popen(
            [sys.executable, "-m", "durable", sub, "--help"], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for sub in subcommands
    }
    for sub, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"durable {sub} --help: {err}"
        assert out.startswith(f"usage: durable {sub}")


# -- systemd --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_is_a_notify_service_with_a_user_hardening_and_a_long_stop_timeout(path: Path) -> None:
    service = unit(path)["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert shlex.split(service["ExecStart"]) == ["/opt/durable/venv/bin/durable", "run"]
    assert service["User"] == "durable"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert parse_duration(service["WatchdogSec"]) > 0
    for key, value in HARDENING.items():
        assert service.get(key) == value, f"{path.name}: {key}={value} missing"
    stop = parse_duration(service["TimeoutStopSec"])
    grace = Settings.from_env(env_file(ENV_EXAMPLE)).shutdown_grace
    assert stop > max(DEFAULT_GRACE, grace)
    assert "/etc/durable/" in service["EnvironmentFile"]


def test_the_example_environment_file_holds_valid_settings() -> None:
    env = env_file(ENV_EXAMPLE)
    assert unknown_variables(env) == ()
    Settings.from_env(env)
    for path in UNITS:
        assert ENV_EXAMPLE.name in path.read_text(), f"{path.name} does not point at the example"


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # ExecStart must name an executable that exists here: a `durable` running this checkout.
    durable = tmp_path / "bin" / "durable"
    durable.parent.mkdir()
    durable.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m durable "$@"\n')
    durable.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for path in UNITS:
        text = path.read_text().replace("/opt/durable/venv/bin/durable", str(durable))
        (units / path.name).write_text(text)
    exec_start = shlex.split(unit(units / "durable.service")["Service"]["ExecStart"])
    assert subprocess.run([*exec_start, "--help"], capture_output=True, timeout=60).returncode == 0
    for name in ("durable.service", "durable@orders.service"):
        done = subprocess.run(
            [analyze, "verify", "--man=no", str(units / name)],
            capture_output=True, text=True, timeout=60,
        )
        complaints = [line for line in done.stderr.splitlines() if str(units) in line]
        assert done.returncode == 0 and not complaints, done.stderr
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(units / "durable.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout[-600:]


# -- containers -----------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_and_stops_and_checks_with_durable() -> None:
    steps = dockerfile_instructions(DEPLOY / "container" / "Dockerfile")
    stages = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert stages and all(steps[i][1].split()[0] == "python:3.11-slim" for i in stages)
    final = steps[stages[-1]:]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("STOPSIGNAL", "SIGTERM") in final
    [health] = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert healthcheck_argv(health)[:2] == ["durable", "check"]
    [cmd] = [rest for word, rest in final if word == "CMD"]
    assert exec_form(cmd) == ["durable", "run"]
    ignore = (DEPLOY / "container" / "Dockerfile.dockerignore").read_text()
    for needed in ("pyproject.toml", "README.md", "durable/", "sql/", "deploy/example/"):
        assert f"!{needed}" in ignore


def test_compose_runs_postgres_a_migration_and_two_daemons_with_the_example_package() -> None:
    compose_file = DEPLOY / "container" / "compose.yaml"
    services = yaml_documents(compose_file)[0]["services"]
    assert services["postgres"]["image"] == "postgres:16"
    migrate, daemon = services["migrate"], services["durable"]
    assert migrate["command"] == ["durable", "migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert daemon["command"] == ["durable", "run"]
    assert daemon["deploy"]["replicas"] == 2
    assert daemon["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    env = {k: str(v) for k, v in daemon["environment"].items()}
    assert unknown_variables(env) == ()
    settings = Settings.from_env(env)
    assert parse_duration(daemon["stop_grace_period"]) > max(DEFAULT_GRACE, settings.shutdown_grace)
    build = daemon["build"]
    context = (compose_file.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file()
    assert (context / build["args"]["APP_PACKAGES"] / "pyproject.toml").is_file()


def test_example_package_registers_its_tasks_through_its_entry_point() -> None:
    example = DEPLOY / "example"
    project = tomllib.loads((example / "pyproject.toml").read_text())
    [module] = project["project"]["entry-points"]["durable"].values()
    for package in project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        assert (example / package / "__init__.py").is_file()
    code = (
        "from durable.registry import load\n"
        f"reg = load([{module!r}], use_entry_points=False)\n"
        "print(sorted((d.name, d.kind) for d in reg.definitions()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={
            "PYTHONPATH": f"{example}:{ROOT}",
            "PATH": "/usr/bin:/bin",
            "PYTHONDONTWRITEBYTECODE": "1",
        },
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[('greet', 'task'), ('welcome', 'workflow')]"


# -- Kubernetes -----------------------------------------------------------------------------


def test_kubernetes_deployment_probes_config_secret_and_grace() -> None:
    objects = manifests()
    assert set(objects) >= {"ConfigMap", "Deployment", "Job", "Secret", "Kustomization"}
    config = objects["ConfigMap"]
    data = {k: str(v) for k, v in config["data"].items()}
    assert "DURABLE_DATABASE_URL" not in data, "the URL holds a password: keep it in the Secret"
    assert unknown_variables(data) == ()
    settings = Settings.from_env(data)
    assert settings.http is not None

    deployment = objects["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > max(DEFAULT_GRACE, settings.shutdown_grace)
    assert spec["securityContext"]["runAsNonRoot"] is True
    [container] = spec["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    secret = objects["Secret"]
    for c in [container, *objects["Job"]["spec"]["template"]["spec"]["containers"]]:
        [url] = [e for e in c["env"] if e["name"] == "DURABLE_DATABASE_URL"]
        ref = url["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.http[1]
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert all(p["port"] == "http" for p in probes.values())
    assert objects["Job"]["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")

    kustomization = objects["Kustomization"]
    for resource in kustomization["resources"]:
        assert (DEPLOY / "kubernetes" / resource).is_file()
