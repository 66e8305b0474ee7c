"""A charging point's side of its sealed channel with Central (docs/security.md).

The CP holds the keys Central issued to it (handed over by its monitor after each
authentication), seals its events with the newest one and opens Central's sealed commands with
whichever key they name, refusing forged, moved, replayed and (optionally) stale ones. No I/O:
the engine (EV_CP_E) and the fleet simulator's engines (tools/fleet) move the bytes.
"""

from __future__ import annotations

from shared.messages import CP_COMMANDS, CPCommand, Message, decode, encode
from shared.sealing import ReplayGuard, Sealer, SealError, is_sealed, open_sealed, parse, unb64


class KeyNotKnown(SealError):
    """A command sealed with a key this CP does not hold (maybe one still on its way)."""

    def __init__(self, cp_id: str, key_id: str) -> None:
        super().__init__(f"a command sealed with key {key_id}, not one of {cp_id}'s")
        self.key_id = key_id


class CPChannel:
    """One CP's key ring, its event sealer and its guard against replayed commands.

    `old_keys` keys are kept besides the newest, to open commands Central sealed just before a
    rotation. How old a command is, is for the caller to judge (by the broker's stamp).
    """

    def __init__(
        self,
        cp_id: str,
        *,
        old_keys: int = 2,
        max_streams: int = 64,
    ) -> None:
        self.cp_id = cp_id
        self.old_keys = old_keys
        self._keys: dict[str, bytes] = {}
        self._sealer: Sealer | None = None
        self._replay = ReplayGuard(max_streams=max_streams)

    @property
    def ready(self) -> bool:
        """Whether there is a key to seal events with."""
        return self._sealer is not None

    @property
    def key_id(self) -> str | None:
        """The key events are sealed with now."""
        return self._sealer.key_id if self._sealer is not None else None

    def take_key(self, key_id: str, key: str | bytes) -> bool:
        """Hold a new key (raw, or base64 as it travels) and seal with it from now on.

        False, and no change, when the key is held already.
        """
        if key_id in self._keys:
            return False
        raw = unb64(key, "key") if isinstance(key, str) else key
        while len(self._keys) > self.old_keys:
            self._keys.pop(next(iter(self._keys)))  # the oldest goes first
        self._keys[key_id] = raw
        self._sealer = Sealer("cp-event", self.cp_id, key_id, raw)
        return True

    def revoke(self) -> None:
        """Central took the keys back: nothing is sealed or opened until a new one comes."""
        self._keys.clear()
        self._sealer = None

    def seal(self, event: Message) -> bytes:
        """An event of this CP, sealed with the newest key; SealError when there is none."""
        if self._sealer is None:
            raise SealError(f"no key to seal {self.cp_id}'s events with")
        return self._sealer.seal(event.id, encode(event))

    def open(self, value: bytes) -> CPCommand:
        """Central's command to this CP in a record's value, authenticated and not replayed.

        Raises KeyNotKnown when it is sealed with a key not held (yet), SealError when it is not
        genuine, MessageError when it is not a valid command.
        """
        if not is_sealed(value):
            raise SealError("commands must be sealed with this CP's key")
        envelope = parse(value)
        if envelope.principal != self.cp_id or envelope.ch != "cp-command":
            raise SealError(f"an envelope for {envelope.principal} ({envelope.ch})")
        key = self._keys.get(envelope.key_id)
        if key is None:
            raise KeyNotKnown(self.cp_id, envelope.key_id)
        self._replay.check(envelope)
        command = decode(CP_COMMANDS, open_sealed(envelope, key))
        if command.id != envelope.id or command.cp_id != self.cp_id:
            raise SealError("the sealed command does not match its envelope")
        self._replay.accept(envelope)
        return command
