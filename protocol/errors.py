"""Every error the project raises on purpose.

Each error carries a stable upper-case ``code`` (scripts and peers match on it), a
``message`` that says what is wrong, and a ``hint`` that says what to do. Anything that
crosses the wire or reaches a user is one of these; any other exception is a bug.
"""

from __future__ import annotations


class FednodeError(Exception):
    """Base of all project errors."""

    code = "ERROR"
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class UsageError(FednodeError):
    """A command-line option or argument the tool refuses (exit 2); the message names it."""

    code = "USAGE"
    hint = "read the message; --help lists the options and their accepted values"


class DecodeError(FednodeError):
    """Bytes that are not a well-formed frame (bad CBOR, wrong shape, truncated)."""

    code = "BAD_FRAME"
    hint = "the peer sent bytes that are not a fednode frame; check versions on both sides"


class ValidationError(FednodeError):
    """A well-formed message whose fields are missing, of the wrong type or out of range."""

    code = "INVALID_MESSAGE"
    hint = "the named field must be fixed by the sender"


class Unsupported(ValidationError):
    """A name or setting this node has not registered (a strategy, codec, privacy mechanism,
    model kind, data source or round setting): looked up, never imported (protocol.plugins)."""

    code = "UNSUPPORTED"
    hint = "use a name this node lists, or update the node that lacks it"


class SignatureError(FednodeError):
    """A signature that does not verify under the sender's key."""

    code = "BAD_SIGNATURE"
    hint = "the message was altered or signed by another key; it was dropped"


class ReplayError(FednodeError):
    """An envelope seen before, out of order, or outside the clock-skew window."""

    code = "REPLAY"
    hint = "check the clocks of both machines (NTP) and that nothing resends old frames"


class HandshakeError(FednodeError):
    """The mutual authentication did not complete."""

    code = "HANDSHAKE_FAILED"
    hint = "check the peer ID you expect and the versions of both nodes"


class PeerMismatch(HandshakeError):
    """The remote key does not belong to the peer ID we meant to reach."""

    code = "PEER_MISMATCH"
    hint = "the node at this address is not the one you named; check --coordinator-id"


class NotAuthorized(FednodeError):
    """An authenticated peer asked for something its role does not allow."""

    code = "NOT_AUTHORIZED"
    hint = "start the coordinator with --operator <your peer id> (see `fedctl whoami`)"


class IdentityError(FednodeError):
    """A key file that is missing, malformed or too widely readable."""

    code = "IDENTITY"
    hint = "run `fednode init` (or `fedctl whoami`) to create a key; keys must be mode 0600"


class SpecError(FednodeError):
    """A session spec field with a bad name, type or value."""

    code = "SPEC_INVALID"
    hint = "run `fedctl session init` to see every field with its accepted values"


class CIDError(FednodeError):
    """Content whose hash does not match its CID, or a malformed CID."""

    code = "CID_MISMATCH"
    hint = "the block was corrupted or tampered with; fetch it again from a trusted source"


class BlockStreamError(CIDError):
    """A model download whose blocks are not the DAG of the CID asked for: out of order,
    after the end, or more than the spec's model can be (protocol.blockstream)."""

    code = "BAD_BLOCK_STREAM"
    hint = (
        "the coordinator sent blocks that are not the model it named; the task was refused, "
        "tell the coordinator's operator"
    )


class NotFound(FednodeError):
    """A session, model, block or peer that does not exist."""

    code = "NOT_FOUND"
    hint = "list what exists first (`fedctl session list`, `fedctl model list`)"


class StateError(FednodeError):
    """An action that the current state does not allow (start a finished session, ...)."""

    code = "BAD_STATE"
    hint = "check the session's status with `fedctl session status`"


class DataError(FednodeError):
    """A dataset spec or file that cannot be loaded."""

    code = "DATA_INVALID"
    hint = "use digits:K/N or a local csv:, parquet:, npz: file, an idx: or images: folder"


class SchemaMismatch(DataError):
    """Data that loads but differs from the session's `[data]` schema (a column, a class, an
    image's shape or mode, the feature count): a participant declines the task rather than
    train on it."""

    code = "SCHEMA_MISMATCH"
    hint = "make the data match the spec's [data] schema, or fix the schema"


class ModelCodeError(FednodeError):
    """A python model (spec ``model.kind = "python"``) this node will not or cannot build
    from its own code; a participant declines the task, a coordinator refuses the session."""

    code = "MODEL_BUILD_FAILED"
    hint = "see the message; fix the factory or its model.args, or the node's installed code"


class ModelNotAllowed(ModelCodeError):
    """A factory this node's operator did not allow: refused before anything is imported."""

    code = "MODEL_NOT_ALLOWED"
    hint = (
        "the node's operator allows a factory with `fednode run --allow-model MODULE:NAME` or "
        "by installing a package that declares it as a `fednode.models` entry point"
    )


class ModelMismatch(ModelCodeError):
    """The model this node's code builds differs from the spec's fingerprint (a tensor
    missing, extra, or of another shape or dtype) or from its task's outputs."""

    code = "MODEL_MISMATCH"
    hint = (
        "install the same version of the model's code on every node, or print the fingerprint "
        "of the code meant (`fednode fingerprint FACTORY --args JSON`) into the spec"
    )


class StorageUnavailable(FednodeError):
    """The node's ledger or content store cannot be written now (locked, disk full, I/O)."""

    code = "STORAGE_UNAVAILABLE"
    hint = (
        "the node's disk is full, its ledger is locked by another process, or its storage "
        "failed; sessions continue by themselves once it can write again"
    )


class AggregateRejected(FednodeError):
    """A round's aggregate that must not be published: not finite, its validation loss
    jumped, or (secure aggregation) its sum breaks the bounds every honest participant keeps.
    The round is recorded ``rejected``; the next round starts from the current model."""

    code = "AGGREGATE_REJECTED"
    hint = "see the round's reason and the session's alerts; a participant may be poisoning"


class BadBackup(FednodeError):
    """A backup file that `fednode restore` refuses (fednode/backup.py): not a fednode backup,
    or a member that breaks a rule; the message names the member and what is wrong."""

    code = "BAD_BACKUP"
    hint = (
        "the file is damaged, not a fednode backup, or was altered; nothing was written. "
        "Use another copy of the backup"
    )
