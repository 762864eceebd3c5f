"""The HTTP side of OTA: releases and rollouts under /api/v1 (token and role), and the
nodes' downloads under /ota (no token: what is served is signed, and read-only).

    GET  /ota/releases/<V>/manifest.json | manifest.sig | files/<path>    (Range, ETag, HEAD)
    GET  /api/v1/releases, /api/v1/releases/<V>; POST /api/v1/releases (admin: builds and signs)
    GET  /api/v1/rollouts, /api/v1/rollouts/<id>; POST /api/v1/rollouts, .../<id>/pause|resume|abort

`fleet/api.py` includes `ROUTERS`. Downloads answer `Range: bytes=N-`,
`bytes=N-M` and `bytes=-N` with 206 and `Content-Range`, a range past the end
with 416, `If-None-Match` with 304 and `If-Range` as HTTP says; the `ETag` is
the file's SHA-256 in quotes. A release is served only once it is recorded in
the registry, and only the files its manifest lists.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Path as PathParam, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fleet import keys as K
from fleet import releases as R
from fleet import rollouts as RO
from fleet.api import (_CONFLICT, _ERRORS, _NOT_FOUND, PREFIX, READERS, ApiError, Caller, Paging, Reg,
                       error_response, invalid, page_of_list, requires)

_CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")

Version = Annotated[str, PathParam(description="the release's version, like 1.2.0")]
RolloutId = Annotated[int, PathParam(description="the rollout's id")]


def _api_error(exc: R.ReleaseError | RO.RolloutError, field: str) -> ApiError:
    """The layer's error as the API's: 422 naming the field, 404 or 409."""
    if exc.code == "invalid_request":
        return invalid(exc.field or field, str(exc))
    return ApiError({"not_found": 404, "conflict": 409}[exc.code], exc.code, str(exc))


# -- releases -------------------------------------------------------------------

releases_router = APIRouter(prefix=PREFIX + "/releases", tags=["releases"], responses=_ERRORS)


class ReleaseRequest(BaseModel):
    """Build and sign a bundle release from the fleet host's firmware tree."""
    model_config = ConfigDict(extra="forbid")
    version: str = Field(description="the new version, like 1.2.0 (never reused)")
    boards: list[str] | None = Field(None, description="board names (default: every board)")
    min_version: str | None = Field(None, description="the oldest running version that may take it")


@releases_router.get("", summary="List the releases")
async def list_releases(reg: Reg, page: Paging, _: Annotated[Caller, Depends(requires(*READERS))]) -> dict:
    """Every recorded release, newest version first: kind, boards, min_version, the signing key's
    id, total_size (bytes on the node) and source_bytes (the source it was compiled from)."""
    return page_of_list(R.releases(reg), page)


@releases_router.get("/{version}", summary="One release and its manifest", responses=_NOT_FOUND)
async def get_release(reg: Reg, version: Version, _: Annotated[Caller, Depends(requires(*READERS))]) -> dict:
    """The release's record and its signed manifest (every file with its size and SHA-256)."""
    try:
        row = R.require(reg, version)
        return row | {"manifest": R.read_manifest(row["path"])}
    except R.ReleaseError as exc:
        raise _api_error(exc, "version") from None


@releases_router.post("", status_code=201, summary="Build and sign a release", responses=_CONFLICT)
async def build_release(reg: Reg, body: ReleaseRequest, caller: Annotated[Caller, Depends(requires())]) -> dict:
    """Compiles the fleet host's firmware/ with mpy-cross, signs the manifest with the fleet's
    key (`IWAKI_KEYS_DIR`), stores it under `IWAKI_RELEASES_DIR` and records it; returns the
    manifest. 409 when the version exists or the fleet has no signing key yet. Image releases
    are built with `fleet release build --image` on the host."""
    try:
        R.check_new(reg, body.version)
        manifest, path = await anyio.to_thread.run_sync(
            lambda: R.assemble(body.version, body.boards, body.min_version))
        R.record(reg, manifest, path, caller.name)
    except R.ReleaseError as exc:
        raise _api_error(exc, "version") from None
    except K.KeysError as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    return manifest


# -- rollouts -------------------------------------------------------------------

rollouts_router = APIRouter(prefix=PREFIX + "/rollouts", tags=["rollouts"], responses=_ERRORS)


class RolloutRequest(BaseModel):
    """Start rolling out a release (see docs/ota.md for waves, soak and the threshold)."""
    model_config = ConfigDict(extra="forbid")
    release: str = Field(description="the release's version")
    waves: list[str] = Field(list(RO.DEFAULT_WAVES), min_length=1,
                             description="node counts or percentages of the targets, in order")
    soak_s: float = Field(600.0, ge=0, description="seconds to wait after a wave before the next")
    threshold: float = Field(0.2, ge=0, le=1, description="halt when this fraction of finished updates failed")
    nodes: list[str] | None = Field(None, description="only these nodes (default: every node of the boards)")
    force: bool = Field(False, description="let nodes running a newer version take it (a downgrade)")


class ReasonRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500, description="why, for the record")


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(None, ge=0, le=1, description="a new failure threshold")


@rollouts_router.get("", summary="List the rollouts")
async def list_rollouts(reg: Reg, page: Paging, _: Annotated[Caller, Depends(requires(*READERS))],
                        state: Annotated[Literal["running", "paused", "halted", "aborted", "done"] | None,
                                         Query(description="only rollouts in this state")] = None) -> dict:
    """Newest first, each with its waves, current wave, deployment counts by state and failure rate."""
    rows = [r for r in RO.rollouts(reg) if state is None or r["state"] == state]
    return page_of_list(rows, page)


@rollouts_router.post("", status_code=201, summary="Start a rollout", responses=_NOT_FOUND | _CONFLICT)
async def start_rollout(reg: Reg, body: RolloutRequest,
                        caller: Annotated[Caller, Depends(requires("operator"))]) -> dict:
    """Creates a deployment for every target node, in waves; `fleet serve` then sends the update
    wave by wave. 404 for an unknown release or node; 409 when another rollout is active or no
    node needs the release."""
    try:
        return RO.start(reg, body.release, body.waves, body.soak_s, body.threshold, caller.name, body.nodes,
                        body.force)
    except (RO.RolloutError, R.ReleaseError) as exc:
        raise _api_error(exc, "release") from None


@rollouts_router.get("/{rollout_id}", summary="One rollout in detail", responses=_NOT_FOUND)
async def get_rollout(reg: Reg, rollout_id: RolloutId, _: Annotated[Caller, Depends(requires(*READERS))]) -> dict:
    """The rollout, and every deployment (node, wave, state, from_version, reason) with its history."""
    try:
        return RO.detail(reg, rollout_id)
    except RO.RolloutError as exc:
        raise _api_error(exc, "rollout_id") from None


@rollouts_router.post("/{rollout_id}/pause", summary="Pause a rollout", responses=_NOT_FOUND | _CONFLICT)
async def pause_rollout(reg: Reg, rollout_id: RolloutId, caller: Annotated[Caller, Depends(requires("operator"))],
                        body: ReasonRequest | None = None) -> dict:
    """No more nodes are sent the update; those already updating go on. 409 unless running."""
    try:
        return RO.pause(reg, rollout_id, caller.name, body.reason if body else None)
    except RO.RolloutError as exc:
        raise _api_error(exc, "rollout_id") from None


@rollouts_router.post("/{rollout_id}/resume", summary="Resume a rollout", responses=_NOT_FOUND | _CONFLICT)
async def resume_rollout(reg: Reg, rollout_id: RolloutId, caller: Annotated[Caller, Depends(requires("operator"))],
                         body: ResumeRequest | None = None) -> dict:
    """A paused or halted rollout runs again. A halted one needs a failure rate within the
    threshold: send a higher `threshold` to accept the failures so far (409 otherwise)."""
    try:
        return RO.resume(reg, rollout_id, caller.name, body.threshold if body else None)
    except RO.RolloutError as exc:
        raise _api_error(exc, "rollout_id") from None


@rollouts_router.post("/{rollout_id}/abort", summary="Abort a rollout", responses=_NOT_FOUND | _CONFLICT)
async def abort_rollout(reg: Reg, rollout_id: RolloutId, caller: Annotated[Caller, Depends(requires("operator"))],
                        body: ReasonRequest | None = None) -> dict:
    """Ends it: nodes not yet sent the update are skipped; updates under way still finish on
    their nodes and are recorded. 409 when it is already over."""
    try:
        return RO.abort(reg, rollout_id, caller.name, body.reason if body else None)
    except RO.RolloutError as exc:
        raise _api_error(exc, "rollout_id") from None


# -- downloads (no token) ---------------------------------------------------------

downloads_router = APIRouter(prefix="/ota/releases", include_in_schema=False)


def _release_path(reg, version: str) -> Path:
    row = R.get(reg, version)
    if row is None:
        raise ApiError(404, "not_found", f"no release {version!r} on this fleet")
    return Path(row["path"])


@downloads_router.api_route("/{version}/manifest.json", methods=["GET", "HEAD"])
async def download_manifest(request: Request, reg: Reg, version: Version) -> Response:
    path = _release_path(reg, version) / "manifest.json"
    return _serve(request, path, _sha256(path), "application/json")


@downloads_router.api_route("/{version}/manifest.sig", methods=["GET", "HEAD"])
async def download_signature(request: Request, reg: Reg, version: Version) -> Response:
    path = _release_path(reg, version) / "manifest.sig"
    return _serve(request, path, _sha256(path), "text/plain; charset=utf-8")


@downloads_router.api_route("/{version}/files/{file_path:path}", methods=["GET", "HEAD"])
async def download_file(request: Request, reg: Reg, version: Version, file_path: str) -> Response:
    root = _release_path(reg, version)
    try:
        manifest = R.read_manifest(root)
    except R.ReleaseError:
        raise ApiError(404, "not_found", f"the manifest of release {version} is missing on the fleet host") from None
    entry = next((f for f in manifest["files"] if f["path"] == file_path), None)
    if entry is None or not R.safe_path(file_path):
        raise ApiError(404, "not_found", f"release {version} has no file {file_path!r} (its manifest lists them)")
    return _serve(request, root / "files" / file_path, entry["sha256"], "application/octet-stream")


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        raise ApiError(404, "not_found", f"{path.name} is missing from the release on the fleet host") from None


def _serve(request: Request, path: Path, sha256: str, media_type: str) -> Response:
    """The file, whole or the asked range, with Content-Length, ETag and Accept-Ranges."""
    try:
        size = path.stat().st_size
    except OSError:
        raise ApiError(404, "not_found", f"{path.name} is missing from the release on the fleet host") from None
    etag = f'"{sha256}"'
    headers = {"etag": etag, "accept-ranges": "bytes"}
    if etag in _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    wanted = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if wanted and (if_range is None or if_range.strip() == etag):
        span = byte_range(wanted, size)
        if span == "unsatisfiable":
            return error_response(416, "range_not_satisfiable",
                                  f"{wanted} starts past the end of {path.name} ({size} bytes)",
                                  headers={"content-range": f"bytes */{size}", **headers})
        if span is not None:
            start, end = span
            headers |= {"content-range": f"bytes {start}-{end}/{size}", "content-length": str(end - start + 1)}
            return _body(request, path, start, end - start + 1, 206, headers, media_type)
    headers["content-length"] = str(size)
    return _body(request, path, 0, size, 200, headers, media_type)


def byte_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(first, last) byte of a single `Range: bytes=...` for a file of `size` bytes, "unsatisfiable"
    for one that starts past the end, None for a header to ignore (not a single byte range)."""
    m = _RANGE.match(header.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
        if m.group(2) and end < start:
            return None
        if start >= size:
            return "unsatisfiable"
        return start, min(end, size - 1)
    suffix = int(m.group(2))
    if suffix == 0 or size == 0:
        return "unsatisfiable"
    return max(0, size - suffix), size - 1


def _etags(header: str | None) -> list[str]:
    if not header:
        return []
    return [t.strip().removeprefix("W/") for t in header.split(",")]


def _body(request: Request, path: Path, start: int, length: int, status: int, headers: dict,
          media_type: str) -> Response:
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)

    def chunks():
        with open(path, "rb") as fh:
            fh.seek(start)
            left = length
            while left > 0:
                data = fh.read(min(_CHUNK, left))
                if not data:
                    return
                left -= len(data)
                yield data

    return StreamingResponse(chunks(), status_code=status, headers=headers, media_type=media_type)


# -- what fleet/api.py includes -----------------------------------------------------

ROUTERS = (releases_router, rollouts_router, downloads_router)


def _document_roles() -> None:
    """As fleet/api.py does for its routers: each token route names its roles in its description,
    and a token route without exactly one role check is refused at import."""
    for router in (releases_router, rollouts_router):
        for route in router.routes:
            roles = [d.call.roles for d in route.dependant.dependencies if hasattr(d.call, "roles")]
            if len(roles) != 1:
                raise RuntimeError(f"{route.path} needs exactly one requires(...), not {len(roles)}")
            route.description = (route.description or "").rstrip() + "\n\nRoles: " + ", ".join(roles[0]) + "."


_document_roles()
