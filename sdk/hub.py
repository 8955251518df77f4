"""Published weights by name: ``hf:OWNER/REPO[@REVISION]`` through ``huggingface_hub``.

    kpface export recognizer --weights hf:minchul/cvlface_adaface_vit_base_kprpe_webface4m
    kpface export keypoints  --weights hf:minchul/cvlface_DFA_mobilenet@<commit>

The file (``model.safetensors``, keys ``model.net.*``) goes into the standard Hugging Face
cache, so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1`` and tokens (``HF_TOKEN`` or
``hf auth login``) work as they do for every other Hugging Face tool; a file already in the
cache is used without the network. The architecture follows from the repo (:data:`HUB_ARCHS`)
when none is named. Offline or unreachable: one line naming the repo, the file and the manual
route (download it yourself and pass its path). Torch-free; needs the ``hub`` extra.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, InputError

log = logging.getLogger(__name__)

PREFIX = "hf:"
WEIGHTS_FILE = "model.safetensors"
# Published CVLface repos: (architecture their model.safetensors holds, its task).
HUB_ARCHS = {
    "minchul/cvlface_adaface_vit_base_kprpe_webface4m": ("vit_kprpe_base", "recognizer"),
    "minchul/cvlface_adaface_vit_base_kprpe_webface12m": ("vit_kprpe_base", "recognizer"),
    "minchul/cvlface_DFA_mobilenet": ("dfa_mnet025", "keypoints"),
}
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class HubName:
    repo: str
    revision: str | None = None  # None: the repo's default branch

    def __str__(self) -> str:
        return PREFIX + self.repo + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubFile:
    repo: str
    revision: str  # the commit the cache holds the file under
    file: str      # its name in the repo
    path: Path     # where it is on this machine


def is_hub_name(weights) -> bool:
    return isinstance(weights, str) and weights.startswith(PREFIX)


def parse(name: str) -> HubName:
    """``hf:OWNER/REPO[@REVISION]`` -> :class:`HubName`; anything else is refused."""
    body = name[len(PREFIX):] if name.startswith(PREFIX) else name
    repo, _, revision = body.partition("@")
    if not _REPO.match(repo) or ("@" in body and not revision):
        raise InputError(f"{name!r} is not a Hugging Face weights name; write "
                         "hf:OWNER/REPO or hf:OWNER/REPO@REVISION")
    return HubName(repo, revision or None)


def arch_for(name: str, task: str | None = None, arch: str | None = None) -> str:
    """The architecture to build for ``name``: the one the repo is known to hold
    (:data:`HUB_ARCHS`), checked against ``task`` and against an ``arch`` the user named;
    ``arch`` itself for a repo not in the table; refused when there is neither."""
    repo = parse(name).repo
    known = HUB_ARCHS.get(repo)
    if known is None:
        if arch is None:
            raise InputError(f"{repo} is not a repo kpface knows the architecture of "
                             f"({', '.join(HUB_ARCHS)}); name it with --arch")
        return arch
    known_arch, known_task = known
    if task is not None and task != known_task:
        raise InputError(f"{repo} holds a {known_task} ({known_arch}), not a {task}; "
                         f"use `kpface export {known_task} --weights {name}`")
    if arch is not None and arch != known_arch:
        raise InputError(f"{repo} holds {known_arch} weights, not {arch}; "
                         f"drop --arch or pass --arch {known_arch}")
    return known_arch


def _manual_route(hub: HubName, filename: str) -> str:
    rev = hub.revision or "main"
    return (f"download https://huggingface.co/{hub.repo}/resolve/{rev}/{filename} yourself "
            f"and pass its path with --weights PATH")


def download(name: str, filename: str = WEIGHTS_FILE) -> HubFile:
    """The cached (or freshly downloaded) file of ``name``, and the commit it belongs to."""
    hub = parse(name)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(f"hf: weights need huggingface_hub: pip install 'kpface[hub]'; "
                              f"or {_manual_route(hub, filename)}") from None
    from huggingface_hub import constants, errors
    log.info("resolving %s/%s in the Hugging Face cache %s%s", hub.repo, filename,
             constants.HF_HUB_CACHE, " (offline)" if constants.HF_HUB_OFFLINE else "")
    try:
        path = Path(hf_hub_download(hub.repo, filename, revision=hub.revision))
    except errors.LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set and the cache does not hold it" if constants.HF_HUB_OFFLINE
               else "the hub could not be reached and the cache does not hold it")
        raise CheckpointError(f"{hub.repo}: {filename}{'@' + hub.revision if hub.revision else ''}"
                              f" is not available ({why}); {_manual_route(hub, filename)}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise CheckpointError(f"{hub.repo}: repository not found or not accessible "
                              f"({type(e).__name__}; a private or gated repo needs HF_TOKEN); "
                              f"{_manual_route(hub, filename)}") from None
    except (errors.RevisionNotFoundError, errors.EntryNotFoundError) as e:
        raise CheckpointError(f"{hub.repo}: no {filename} at revision {hub.revision or 'main'} "
                              f"({type(e).__name__})") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{hub.repo}: {filename} could not be fetched ({first}); "
                              f"{_manual_route(hub, filename)}") from None
    parts = path.parts
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts else (hub.revision or "")
    log.info("%s -> %s (commit %s)", name, path, revision)
    return HubFile(hub.repo, revision, filename, path)
