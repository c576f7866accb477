"""Adapter routes: the registry (versions, current pointer), downloads, pins and rollback (admin).

Version lists are bounded: each adapter shows its newest `versions_limit` versions and
`/adapters/{name}/versions` pages through all of them; `GET /adapters` pages through adapters.
A token bound to some namespaces lists only their adapters; any other reads as absent (404).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse

from memory_store.models import Adapter, AdapterVersion
from memory_store.repositories import AdapterRepository, files_deleted_message
from service.adapters.archive import TarStream, UnsafeAdapterPath, resolve_version_dir
from service.api.auth import Principal, ensure_may_see, ensure_may_write
from service.api.deps import AuthenticatedRoute, PrincipalDep, SessionDep, SettingsDep, require
from service.api.errors import AdapterFilesUnavailable, InvalidField, ResourceNotFound
from service.api.schemas import (
    MAX_ID,
    MAX_PAGE,
    NAMESPACE_PATTERN,
    AdapterList,
    AdapterPublic,
    AdapterVersionDetail,
    AdapterVersionPage,
    AdapterVersionPublic,
    PinRequest,
    RollbackRequest,
)

if TYPE_CHECKING:
    from service.adapters.registry import AdapterRegistry
    from service.config import Settings

router = APIRouter(tags=["adapters"], route_class=AuthenticatedRoute)

AdapterName = Annotated[str, Path(min_length=1, max_length=64, pattern=NAMESPACE_PATTERN)]
VersionNumber = Annotated[int, Path(ge=0, le=MAX_ID)]
SHA256_HEADER = "X-Adapter-Sha256"
DEFAULT_VERSIONS_LIMIT = 100
VersionsLimit = Annotated[
    int, Query(ge=1, le=MAX_PAGE, description="newest versions listed per adapter (older: /versions)")
]


def visible(principal: Principal, name: str) -> None:
    """An adapter outside the token's namespaces answers exactly as one that does not exist."""
    ensure_may_see(principal, name, "adapter", name)


def version_public(row: AdapterVersion) -> AdapterVersionPublic:
    return AdapterVersionPublic(
        version=row.version,
        status=row.status,
        metrics=row.metrics or {},
        parent=row.parent_version,
        sha256=row.sha256,
        reason=row.reason,
        created_at=row.created_at,
        pinned=bool(row.pinned),
        files_deleted_at=row.files_deleted_at,
    )


def adapter_public(
    adapter: Adapter, versions: list[AdapterVersion], *, total: int | None = None
) -> AdapterPublic:
    """`versions` ascending; when they are the newest `len(versions)` of `total`, the older ones are
    reached from `older_versions_cursor`."""
    total = len(versions) if total is None else total
    older = versions[0].version if versions and total > len(versions) else None
    return AdapterPublic(
        name=adapter.name,
        current=adapter.current_version,
        base_model=adapter.base_model,
        created_at=adapter.created_at,
        versions=[version_public(row) for row in versions],
        versions_total=total,
        older_versions_cursor=older,
    )


def newest_versions_public(repository: AdapterRepository, adapter: Adapter, limit: int) -> AdapterPublic:
    """The adapter with its newest `limit` versions (two index-range reads, whatever the history)."""
    newest = list(repository.list_versions(name=adapter.name, limit=limit, newest_first=True))
    return adapter_public(adapter, newest[::-1], total=repository.count_versions(name=adapter.name))


@router.get("/adapters", response_model=AdapterList, dependencies=[require("adapters:read")])
def list_adapters(
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="adapters per page")] = 50,
    cursor: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=NAMESPACE_PATTERN,
            description="`next_cursor` of the previous page (an adapter name)",
        ),
    ] = None,
    versions_limit: VersionsLimit = DEFAULT_VERSIONS_LIMIT,
) -> AdapterList:
    """Adapters by name, each with its newest `versions_limit` versions (ascending)."""
    repository = AdapterRepository(session)
    adapters = repository.list_adapters(
        after_name=cursor, limit=limit, namespace_patterns=principal.namespaces
    )
    next_cursor = adapters[-1].name if len(adapters) == limit else None
    return AdapterList(
        adapters=[newest_versions_public(repository, a, versions_limit) for a in adapters],
        next_cursor=next_cursor,
    )


@router.get("/adapters/{name}", response_model=AdapterPublic, dependencies=[require("adapters:read")])
def read_adapter(
    name: AdapterName,
    session: SessionDep,
    principal: PrincipalDep,
    versions_limit: VersionsLimit = DEFAULT_VERSIONS_LIMIT,
) -> AdapterPublic:
    visible(principal, name)
    repository = AdapterRepository(session)
    return newest_versions_public(repository, repository.get_adapter(name=name), versions_limit)


@router.get(
    "/adapters/{name}/versions", response_model=AdapterVersionPage, dependencies=[require("adapters:read")]
)
def list_versions(
    name: AdapterName,
    session: SessionDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="`next_cursor` of the previous page (a version)")
    ] = None,
    order: Annotated[Literal["asc", "desc"], Query(description="by version number")] = "asc",
) -> AdapterVersionPage:
    """Every version of one adapter, a page at a time (pass `next_cursor` back as `cursor`)."""
    visible(principal, name)
    repository = AdapterRepository(session)
    rows = repository.list_versions(
        name=name, after_version=cursor, limit=limit, newest_first=order == "desc"
    )
    return AdapterVersionPage(
        versions=[version_public(row) for row in rows],
        total=repository.count_versions(name=name),
        next_cursor=rows[-1].version if len(rows) == limit else None,
    )


@router.get(
    "/adapters/{name}/current", response_model=AdapterVersionPublic, dependencies=[require("adapters:read")]
)
def read_current_version(
    name: AdapterName, session: SessionDep, principal: PrincipalDep
) -> AdapterVersionPublic:
    visible(principal, name)
    current = AdapterRepository(session).current(name=name)
    if current is None:
        raise ResourceNotFound(f"adapter {name!r} has no current version yet")
    return version_public(current)


def version_detail(row: AdapterVersion, settings: Settings) -> AdapterVersionDetail:
    """The version with the behaviour report stored in its folder (None when there is none)."""
    from training.adapter_store import METADATA_FILE

    report = None
    try:
        folder = resolve_version_dir(settings.adapters_dir, row.adapter_name, row.version)
        metadata = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        report = metadata.get("behaviour_report") if isinstance(metadata, dict) else None
    except (UnsafeAdapterPath, OSError, ValueError):
        report = None
    return AdapterVersionDetail(**version_public(row).model_dump(), behaviour_report=report)


@router.get(
    "/adapters/{name}/versions/{version}",
    response_model=AdapterVersionDetail,
    dependencies=[require("adapters:read")],
)
def read_version(
    name: AdapterName,
    version: VersionNumber,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> AdapterVersionDetail:
    visible(principal, name)
    return version_detail(AdapterRepository(session).get_version(name=name, version=version), settings)


@router.get(
    "/adapters/{name}/versions/{version}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}, "description": "tar of the version folder"}},
    dependencies=[require("adapters:read")],
)
def download_version(
    name: AdapterName,
    version: VersionNumber,
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
) -> StreamingResponse:
    """The version folder as a tar, streamed; `X-Adapter-Sha256` is its registered digest
    (training.adapter_store.dir_sha256 of the extracted folder). Files that no longer match the
    digest are refused (409)."""
    visible(principal, name)
    row = AdapterRepository(session).get_version(name=name, version=version)
    if row.files_deleted_at is not None:
        raise AdapterFilesUnavailable(files_deleted_message(row))
    if row.path is None or row.sha256 is None:
        raise AdapterFilesUnavailable(f"adapter {name!r} v{version} has no published files yet")
    try:
        folder = resolve_version_dir(settings.adapters_dir, name, version)
    except UnsafeAdapterPath as error:
        raise InvalidField(str(error), field="name") from error
    if not folder.is_dir():
        raise AdapterFilesUnavailable(f"the files of adapter {name!r} v{version} are missing")
    # adapter_store pulls in torch (for the zero adapter); only downloads need it here.
    from training.adapter_store import AdapterIntegrityError, AdapterStore, AdapterStoreError

    try:
        AdapterStore(settings.adapters_dir, clean_stale_temp=False).verify(name, version, row.sha256)
    except (AdapterIntegrityError, AdapterStoreError) as error:
        raise AdapterFilesUnavailable(
            f"adapter {name!r} v{version} does not match its registered sha256; refusing to serve it"
        ) from error
    archive = TarStream(folder, prefix=f"{name}/v{version}")
    return StreamingResponse(
        iter(archive),
        media_type="application/x-tar",
        headers={
            SHA256_HEADER: row.sha256,
            "Content-Length": str(archive.content_length),
            "Content-Disposition": f'attachment; filename="{name}-v{version}.tar"',
        },
    )


def adapter_registry(request: Request) -> AdapterRegistry:
    """The app's one registry (service.app.AppResources.adapter_registry, shared with the
    reconciler and the jobs of `loraloop serve`)."""
    return request.app.state.resources.adapter_registry()


@router.post("/adapters/{name}/rollback", response_model=AdapterPublic, dependencies=[require("admin")])
def rollback_adapter(
    name: AdapterName,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    body: RollbackRequest | None = None,
) -> AdapterPublic:
    """Make an earlier version current (default: the newest retired one before the current).
    Its files are verified and loaded on every vLLM replica before the pointer flips; on failure
    (409) the current version stays."""
    from service.adapters.registry import PromotionFailed

    try:
        adapter_registry(request).rollback(
            name, body.version if body else None, reason=f"rolled back through the API by {principal.label}"
        )
    except PromotionFailed as error:
        raise AdapterFilesUnavailable(str(error)) from error
    session.expire_all()  # the registry committed through its own sessions
    repository = AdapterRepository(session)
    return newest_versions_public(repository, repository.get_adapter(name=name), DEFAULT_VERSIONS_LIMIT)


@router.put(
    "/adapters/{name}/versions/{version}/pin",
    response_model=AdapterVersionPublic,
    dependencies=[require("adapters:write")],
)
def pin_version(
    name: AdapterName, version: VersionNumber, body: PinRequest, session: SessionDep, principal: PrincipalDep
) -> AdapterVersionPublic:
    """Pin (`{"pinned": true}`) or unpin a version: retention never deletes a pinned version's files.
    A version whose files were already deleted cannot be pinned (409)."""
    ensure_may_write(principal, name, field="name")
    row = AdapterRepository(session).set_pinned(name=name, version=version, pinned=body.pinned)
    return version_public(row)
