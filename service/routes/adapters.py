"""Adapter routes: the registry (versions, current pointer), downloads, and rollback (admin)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import StreamingResponse

from memory_store.models import Adapter, AdapterVersion
from memory_store.repositories import AdapterRepository
from service.adapter_archive import TarStream, UnsafeAdapterPath, resolve_version_dir
from service.deps import AuthenticatedRoute, SessionDep, SettingsDep, require
from service.errors import AdapterFilesUnavailable, InvalidField, ResourceNotFound
from service.schemas import (
    MAX_ID,
    NAMESPACE_PATTERN,
    AdapterList,
    AdapterPublic,
    AdapterVersionPublic,
    RollbackRequest,
)

if TYPE_CHECKING:
    from service.registry import AdapterRegistry

router = APIRouter(tags=["adapters"], route_class=AuthenticatedRoute)

AdapterName = Annotated[str, Path(min_length=1, max_length=64, pattern=NAMESPACE_PATTERN)]
VersionNumber = Annotated[int, Path(ge=0, le=MAX_ID)]
SHA256_HEADER = "X-Adapter-Sha256"


def version_public(row: AdapterVersion) -> AdapterVersionPublic:
    return AdapterVersionPublic(
        version=row.version,
        status=row.status,
        metrics=row.metrics or {},
        parent=row.parent_version,
        sha256=row.sha256,
        reason=row.reason,
        created_at=row.created_at,
    )


def adapter_public(adapter: Adapter, versions: list[AdapterVersion]) -> AdapterPublic:
    return AdapterPublic(
        name=adapter.name,
        current=adapter.current_version,
        base_model=adapter.base_model,
        created_at=adapter.created_at,
        versions=[version_public(row) for row in versions],
    )


@router.get("/adapters", response_model=AdapterList, dependencies=[require("adapters:read")])
def list_adapters(session: SessionDep) -> AdapterList:
    adapters = AdapterRepository(session).list_with_versions()
    return AdapterList(adapters=[adapter_public(a, list(a.versions)) for a in adapters])


@router.get("/adapters/{name}", response_model=AdapterPublic, dependencies=[require("adapters:read")])
def read_adapter(name: AdapterName, session: SessionDep) -> AdapterPublic:
    repository = AdapterRepository(session)
    adapter = repository.get_adapter(name=name)
    return adapter_public(adapter, list(repository.list_versions(name=name)))


@router.get(
    "/adapters/{name}/current", response_model=AdapterVersionPublic, dependencies=[require("adapters:read")]
)
def read_current_version(name: AdapterName, session: SessionDep) -> AdapterVersionPublic:
    current = AdapterRepository(session).current(name=name)
    if current is None:
        raise ResourceNotFound(f"adapter {name!r} has no current version yet")
    return version_public(current)


@router.get(
    "/adapters/{name}/versions/{version}",
    response_model=AdapterVersionPublic,
    dependencies=[require("adapters:read")],
)
def read_version(name: AdapterName, version: VersionNumber, session: SessionDep) -> AdapterVersionPublic:
    return version_public(AdapterRepository(session).get_version(name=name, version=version))


@router.get(
    "/adapters/{name}/versions/{version}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}, "description": "tar of the version folder"}},
    dependencies=[require("adapters:read")],
)
def download_version(
    name: AdapterName, version: VersionNumber, session: SessionDep, settings: SettingsDep
) -> StreamingResponse:
    """The version folder as a tar, streamed; `X-Adapter-Sha256` is its registered digest
    (training.adapter_store.dir_sha256 of the extracted folder). Files that no longer match the
    digest are refused (409)."""
    row = AdapterRepository(session).get_version(name=name, version=version)
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
    """The app's registry (`app.state.adapter_registry`), built on first use from the settings."""
    from service.registry import AdapterRegistry, build_hot_swapper  # pulls in torch: only when used

    registry = getattr(request.app.state, "adapter_registry", None)
    if registry is None:
        settings = request.app.state.settings
        registry = AdapterRegistry.from_settings(
            settings, request.app.state.session_factory, build_hot_swapper(settings)
        )
        request.app.state.adapter_registry = registry
    return registry


@router.post("/adapters/{name}/rollback", response_model=AdapterPublic, dependencies=[require("admin")])
def rollback_adapter(
    name: AdapterName, request: Request, session: SessionDep, body: RollbackRequest | None = None
) -> AdapterPublic:
    """Make an earlier version current (default: the newest retired one before the current).
    Its files are verified and loaded on every vLLM replica before the pointer flips; on failure
    (409) the current version stays."""
    from service.registry import PromotionFailed

    try:
        adapter_registry(request).rollback(
            name, body.version if body else None, reason="rolled back through the API"
        )
    except PromotionFailed as error:
        raise AdapterFilesUnavailable(str(error)) from error
    repository = AdapterRepository(session)
    adapter = repository.get_adapter(name=name)
    return adapter_public(adapter, list(repository.list_versions(name=name)))
