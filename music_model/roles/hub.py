"""Where a role's weights come from, checked without loading them (the per-role half of preflight).

`resolve(spec)` says for one role spec where its weights are (the zoo, a local folder, the Hugging
Face cache or the hub), which commit a hub model resolves to, and, when they cannot be loaded, one
line naming the role, the model and what to do. It reads the hub client's own settings
(`HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_HUB_CACHE`, `HF_TOKEN`) and imports no model library.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from data_specs import shipped
from data_specs.roles import RoleSpec, model_kind

# The file a checkpoint of each backend cannot do without (what `save_pretrained` writes first).
CONFIG_FILES = {"transformers": "config.json", "diffusers": "model_index.json", "open_clip": "open_clip_config.json"}
ZOO_LICENCE = {"license": "apache-2.0", "name": "Apache 2.0 (this project's tiny zoo)",
               "outputs": "random weights: the outputs are noise, with no terms of their own"}
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---", re.S)


@dataclass(frozen=True)
class Resolved:
    """One role's weights. `source`: zoo, arch, local, hub, or cache (found in the cache with the
    hub offline or unreachable). `commit`: the hub commit, or a zoo entry's sha256 (of its file
    list). `problem`: why it cannot load, one line. `licence`: as `licence_of` gives it."""

    role: str
    model: str
    source: str
    commit: str | None = None
    problem: str | None = None
    licence: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"model": self.model, "source": self.source, "commit": self.commit, "licence": self.licence}


class HubState:
    """What one preflight learnt about the hub: once it is unreachable, no other role waits on it."""

    def __init__(self) -> None:
        self.unreachable: str | None = None


def repo_id(model: str) -> str:
    return model.removeprefix("hf-hub:")


def cache_folder(repo: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def cached_snapshot(spec: RoleSpec) -> Path | None:
    """The cache's snapshot of the spec's revision, when its config file is there."""
    folder = cache_folder(repo_id(spec.model))
    if spec.pinned:
        commit = spec.revision
    else:
        ref = folder / "refs" / (spec.revision or "main")
        commit = ref.read_text().strip() if ref.is_file() else None
    snapshot = folder / "snapshots" / commit if commit else None
    needed = CONFIG_FILES.get(spec.backend)
    if snapshot is None or not snapshot.is_dir() or (needed and not (snapshot / needed).exists()):
        return None
    return snapshot


def model_page(repo: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo}"


@lru_cache(maxsize=1)
def known_licences() -> dict[str, dict]:
    """The shipped licence table: hub repo -> {license, name, link, outputs}, as each model card states it."""
    with shipped("data/model_licences.yaml").open() as table:
        return yaml.safe_load(table)


def card_licence(snapshot: Path | None) -> str | None:
    """The `license:` of a cached model card's YAML front matter."""
    readme = snapshot / "README.md" if snapshot else None
    if readme is None or not readme.is_file():
        return None
    match = _FRONT_MATTER.match(readme.read_text(errors="replace"))
    meta = yaml.safe_load(match.group(1)) if match else None
    return str(meta["license"]) if isinstance(meta, dict) and meta.get("license") else None


def licence_of(spec: RoleSpec, snapshot: Path | None = None) -> dict:
    """The licence of a role's weights: the zoo's; the shipped table's for the models it names;
    else the cached model card's `license:`; else unknown, with where to read it."""
    kind = model_kind(spec.model)
    if kind in ("zoo", "arch"):
        return dict(ZOO_LICENCE)
    if kind == "hub" and repo_id(spec.model) in known_licences():
        return dict(known_licences()[repo_id(spec.model)])
    found = card_licence(snapshot if kind == "hub" else Path(spec.model).expanduser())
    where = model_page(repo_id(spec.model)) if kind == "hub" else "the folder's model card"
    return {"license": found or "unknown", "name": found or "not stated here", "link": where}


def zoo_commit(spec: RoleSpec) -> str | None:
    """sha256 of a built zoo entry's marker (its files' sha256s); None when not built yet."""
    from music_model.paths import zoo_dir

    marker = zoo_dir() / spec.model.removeprefix("zoo:") / "zoo_entry.json"
    return hashlib.sha256(marker.read_bytes()).hexdigest() if marker.is_file() else None


def _local_problem(spec: RoleSpec, where: str) -> str | None:
    path = Path(spec.model).expanduser()
    needed = CONFIG_FILES.get(spec.backend)
    if needed and path.is_dir() and not (path / needed).exists():
        return (f"{where}: {spec.model} has no {needed}, so it is not a {spec.backend} checkpoint folder "
                f"(`save_pretrained` writes one): point `model` at the folder that holds it")
    return None


def _hub_problem(error: Exception, spec: RoleSpec, where: str) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo = repo_id(spec.model)
    if isinstance(error, GatedRepoError):
        return (f"{where}: {repo} is gated and this machine's hub token has no access: accept its licence at "
                f"{model_page(repo)} while logged in, then run `hf auth login` here (or set HF_TOKEN)")
    if isinstance(error, RevisionNotFoundError):
        return f"{where}: {repo} has no revision {spec.revision!r}: use a branch, tag or commit listed at {model_page(repo)}/tree/main"
    if isinstance(error, RepositoryNotFoundError):
        return (f"{where}: {repo} was not found on the hub (or it is private): check the name, or run "
                f"`hf auth login` with an account that can read it")
    return f"{where}: the hub answered {type(error).__name__} for {repo}: {str(error).splitlines()[0]}"


def _not_cached(spec: RoleSpec, where: str, why: str) -> str:
    repo = repo_id(spec.model)
    revision = f" --revision {spec.revision}" if spec.revision else ""
    remedy = "unset HF_HUB_OFFLINE to download it, or " if why.startswith("HF_HUB_OFFLINE") else ""
    return (f"{where}: {repo}{'@' + spec.revision if spec.revision else ''} is not in the Hugging Face cache "
            f"({cache_folder(repo)}) and {why}: {remedy}run `hf download {repo}{revision}` where the hub is "
            "reachable and copy that cache here (HF_HUB_CACHE)")


def resolve(name: str, spec: RoleSpec, state: HubState | None = None) -> Resolved:
    """Where role `name`'s weights are and their commit, or the one-line problem (module doc)."""
    where = f"roles.{name}"
    kind = model_kind(spec.model)
    if kind in ("zoo", "arch"):
        commit = zoo_commit(spec) if kind == "zoo" else None
        return Resolved(name, spec.model, kind, commit, licence=licence_of(spec))
    if kind == "local":
        return Resolved(name, spec.model, "local", None, _local_problem(spec, where), licence_of(spec))
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    state = state or HubState()
    snapshot = cached_snapshot(spec)
    cached = Resolved(name, spec.model, "cache", snapshot.name, licence=licence_of(spec, snapshot)) if snapshot else None
    if constants.HF_HUB_OFFLINE:
        return cached or Resolved(name, spec.model, "hub", problem=_not_cached(spec, where, "HF_HUB_OFFLINE is set"))
    if state.unreachable is None:
        api, repo = HfApi(), repo_id(spec.model)
        try:
            commit = api.model_info(repo, revision=spec.revision, timeout=10).sha
            api.auth_check(repo)  # model_info is public even for a gated repo; its files are not
            return Resolved(name, spec.model, "hub", commit, licence=licence_of(spec, snapshot))
        except HfHubHTTPError as error:  # the hub answered: gated, not found, no such revision
            return Resolved(name, spec.model, "hub", problem=_hub_problem(error, spec, where))
        except Exception as error:  # no answer: the transport's errors (DNS, refused, timeout)
            state.unreachable = f"{constants.ENDPOINT} is unreachable ({type(error).__name__}: {str(error).splitlines()[0]})"
    return cached or Resolved(name, spec.model, "hub", problem=_not_cached(spec, where, state.unreachable))
