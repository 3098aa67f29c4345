"""llama-server's ``GET/POST /lora-adapters``: the adapters the server loaded (--lora,
--lora-scaled) with their ids and default scales, and new default scales for later requests.
A request picks its own set with ``"lora": [{"id", "scale"}]`` (translate.sampling_kwargs)."""
from __future__ import annotations

from typing import List

from fastapi import APIRouter, Depends

from llamagen.server.auth import require_api_key
from llamagen.server.deps import get_engine
from llamagen.server.models import LoraEntry
from llamagen.server.translate import param_error

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/lora-adapters")
async def list_adapters(engine=Depends(get_engine)):
    out = []
    for i, (a, scale) in enumerate(zip(engine.adapters, engine.lora_scales())):
        entry = {"id": i, "path": str(a.path), "scale": scale, "task_name": a.task_name,
                 "prompt_prefix": a.prompt_prefix}
        if a.alora_invocation_tokens:
            entry["alora_invocation_string"] = engine.detokenize(list(a.alora_invocation_tokens))
            entry["alora_invocation_tokens"] = list(a.alora_invocation_tokens)
        out.append(entry)
    return out


@router.post("/lora-adapters")
async def set_adapters(body: List[LoraEntry], engine=Depends(get_engine)):
    try:
        engine.set_lora_scales({e.id: e.scale for e in body})
    except (ValueError, TypeError) as e:
        raise param_error(e, {}, "lora") from None
    return {"success": True}
