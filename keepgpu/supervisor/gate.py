"""Who may talk to the control socket: the supervisor's side of ZAP (answered by the loop on
its own REP socket, no thread) and the CURVE server keys of a tcp control socket."""

from __future__ import annotations

import logging
from collections.abc import Callable

import zmq

from keepgpu.logfmt import fields
from keepgpu.protocol import keys
from keepgpu.supervisor import zap

log = logging.getLogger("keepgpu.supervisor")


class Gate:
    """ZAP decisions for this supervisor (own uid and root over ipc; CURVE keys over tcp), with
    refusals logged once per peer and then summarised (zap.RefusalLog)."""

    def __init__(self, uid: int, clock: Callable[[], float]) -> None:
        self.uid = uid
        self.clock = clock
        self._own: keys.KeyPair | None = None
        self._refusals = zap.RefusalLog()

    def serve_curve(self, control: zmq.Socket[bytes]) -> None:
        """tcp carries no peer uid: serve CURVE with the user's keypair; ZAP admits the user's
        own public key and the authorized ones (keys.authorized_keys re-reads them when they
        change, so added keys count without a restart). Raises keys.KeyFileError."""
        own = keys.own_keypair()
        control.curve_server = True
        control.curve_secretkey = own.secret
        control.curve_publickey = own.public
        control.zap_domain = zap.TCP_DOMAIN
        self._own = own

    def _curve_keys(self) -> set[bytes]:
        assert self._own is not None
        allowed, problems = keys.authorized_keys(self._own)
        for problem in problems:
            log.warning("authorized keys: %s", problem,
                        extra=fields("authorized-keys", problem=problem))
        return allowed

    def answer(self, frames: list[bytes]) -> list[bytes]:
        """The ZAP reply frames for one request."""
        curve = self._curve_keys if self._own is not None else None
        reply = zap.reply(frames, self.uid, curve)
        if reply[2] != b"200":
            mech = frames[5].decode("ascii", "replace") if len(frames) > 5 else "?"
            address = frames[3].decode("utf-8", "replace") if len(frames) > 3 else "?"
            line = self._refusals.note(address, mech, self.clock())
            if line is not None:
                log.warning("%s", line,
                            extra=fields("peer-refused", peer=address, mechanism=mech))
        return reply
