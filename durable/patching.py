"""Changing a workflow's code under runs in flight: ``ctx.patched`` and
``ctx.deprecate_patch`` (see docs/versioning.md); the event log's side is
``replay.Journal.patch``."""

from __future__ import annotations

from collections.abc import Awaitable

from durable.codec import digest
from durable.replay import PATCH, Journal, PatchCall, check_patch_id

__all__ = ["PatchCall", "Patching"]


class Patching:
    """The patch calls of ``durable.Context``."""

    _log: Journal

    def patched(self, patch_id: str) -> PatchCall:
        """Whether this run takes the new code of the change named ``patch_id``.

        ``if await ctx.patched("fraud-check"): <new code> else: <old code>``. True on a new
        run, and on a run that reaches this point on code that has the patch (a marker is
        recorded in its event log, so every replay answers True again). False for a run
        whose log was recorded before the patch and holds another call here: it replays the
        old branch it took, and keeps it to its end. The first ask of an id decides; later
        asks of the same id in the run get the same answer. See docs/versioning.md.
        """
        check_patch_id("ctx.patched", patch_id)
        return PatchCall(self._patch(patch_id))

    def deprecate_patch(self, patch_id: str) -> Awaitable[None]:
        """``await ctx.deprecate_patch(id)`` where ``if await ctx.patched(id):`` was, once
        no run that took the old branch is left: it records (or replays) the marker and
        keeps no branch. Once no run recorded before this cleanup is left, remove the call:
        a marker the code no longer asks for is stepped over on replay."""
        check_patch_id("ctx.deprecate_patch", patch_id)
        return self._deprecate(patch_id)

    async def _deprecate(self, patch_id: str) -> None:
        await self._patch(patch_id)

    async def _patch(self, patch_id: str) -> bool:
        self._log.begin(PATCH, patch_id)
        try:
            answer, record = self._log.patch(patch_id)
            if record is not None:
                dig = digest(PATCH, patch_id, None)
                await self._log.commit(
                    self._log.checkpoint(record, PATCH, patch_id, dig, result="true")
                )
            return answer
        finally:
            self._log.busy = None
