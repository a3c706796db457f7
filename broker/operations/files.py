"""File operations: upload tickets, completion, metadata, listing, deletion.

The bytes themselves go through broker.http.files (the signed upload and
download URLs these operations hand out), not through the table.
"""

from __future__ import annotations

from typing import Any

from broker.engine import files
from broker.engine.engine import Engine
from broker.operations.registry import Call, agent_of, operation, workspace_of
from protocol import files as pf


@operation("file.upload", pf.UploadFile, auth="agent", output=pf.UploadTicket)
async def upload_file(engine: Engine, call: Call, req: pf.UploadFile) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(files.CreateUpload(
        workspace_id=workspace_id, agent_id=agent_id, filename=req.filename,
        content_type=req.content_type, size_bytes=req.size_bytes, base_url=call.base_url))


@operation("file.complete", pf.FileRef, auth="agent", output=pf.UploadCompleted)
async def complete_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(files.CompleteUpload(
        workspace_id=workspace_id, agent_id=agent_id, file_id=req.file_id,
        base_url=call.base_url))


@operation("file.get", pf.FileRef, auth="any", output=pf.FileInfo)
async def get_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    return await engine.read(files.get_file, workspace_of(call), req.file_id, call.base_url,
                             engine.limits.file_url_ttl_seconds * 1000)


@operation("file.list", pf.ListFiles, auth="any", output=list[pf.FileInfo])
async def list_files(engine: Engine, call: Call, req: pf.ListFiles) -> Any:
    return await engine.read(files.list_files, workspace_of(call), req.uploaded_by, req.limit,
                             req.before, call.base_url, engine.limits.file_url_ttl_seconds * 1000)


@operation("file.delete", pf.FileRef, auth="agent", output=None)
async def delete_file(engine: Engine, call: Call, req: pf.FileRef) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.submit(files.DeleteFile(
        workspace_id=workspace_id, agent_id=agent_id, file_id=req.file_id))
