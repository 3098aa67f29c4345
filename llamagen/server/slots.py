"""llama-server's ``POST /slots/{id}?action=save|restore|erase``: an idle slot's prompt cache
(its KV cells and tokens) written to and read from ``--slot-save-path``, so a long prefix
survives a restart or moves between servers of the same model.  File names are checked: no path
leaves the folder."""
from __future__ import annotations

import os
import time
import unicodedata

from fastapi import APIRouter, Depends, Request

from llamagen.errors import LlamaError
from llamagen.server.auth import require_api_key
from llamagen.server.deps import get_engine, get_state
from llamagen.server.errors import APIError, InvalidRequest, NotServed
from llamagen.server.models import SlotAction
from llamagen.server.translate import param_error

router = APIRouter(dependencies=[Depends(require_api_key)])

_RESERVED = set('/\\:*?"<>|')


def checked_filename(name: str) -> str:
    """``name`` when it is one plain file name (as llama-server's fs_validate_filename), else a
    400: no separators or reserved characters, no control characters, not "." / "..", not
    hidden, at most 255 bytes."""
    ok = (0 < len(name.encode("utf-8", "surrogatepass")) <= 255 and name not in (".", "..")
          and not name.startswith(".") and name == name.strip()
          and not any(c in _RESERVED or unicodedata.category(c)[0] == "C" for c in name))
    if not ok:
        raise InvalidRequest("Invalid filename", param="filename")
    return name


@router.post("/slots/{id_slot}")
async def slot_action(id_slot: str, request: Request, action: str = "",
                      body: SlotAction = None, engine=Depends(get_engine)):
    st = get_state(request)
    folder = st.slot_save_path
    if not folder:
        raise NotServed("This server does not support slots action. Start it with "
                        "`--slot-save-path`", param="action")
    try:
        slot = int(id_slot)
    except ValueError:
        raise InvalidRequest("Invalid slot ID", param="id_slot") from None
    if action not in ("save", "restore", "erase"):
        raise InvalidRequest("Invalid action", param="action")
    if action != "erase" and (body is None or body.filename is None):
        raise InvalidRequest("filename is required", param="filename")
    t0 = time.perf_counter()
    try:
        if action == "erase":
            n = await st.prep.run(lambda: engine.erase_slot(slot))
            return {"id_slot": slot, "n_erased": n}
        name = checked_filename(body.filename)
        path = os.path.join(folder, name)
        if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
            raise InvalidRequest("Invalid filename", param="filename")      # (a symlink out)
        if action == "save":
            n, size = await st.prep.run(lambda: engine.save_slot(slot, path))
            return {"id_slot": slot, "filename": name, "n_saved": n, "n_written": size,
                    "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}
        if not os.path.isfile(path):
            raise InvalidRequest(f"no saved slot named {name!r}", param="filename")
        n, size = await st.prep.run(lambda: engine.restore_slot(slot, path))
        return {"id_slot": slot, "filename": name, "n_restored": n, "n_read": size,
                "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}
    except APIError:
        raise
    except (ValueError, TypeError) as e:
        raise param_error(e, {"slot": "id_slot"}, "id_slot") from None
    except LlamaError as e:
        raise InvalidRequest(str(e), param="filename") from None
