"""The base of every schedule: `state_dict()` is the constructor's arguments, `load_state_dict()` re-checks them by
constructing."""
import inspect
from typing import Any, ClassVar, Dict, List, Mapping

from ib.errors import CheckpointError


class Schedule:
    """A schedule whose state is its constructor's arguments, each kept under its own name."""

    name: ClassVar[str]  # the registry key, also stored in state_dict()
    _kind: ClassVar[str]  # "beta schedule" / "lr schedule", for messages

    @property
    def _where(self) -> str:
        return f"{getattr(self, 'name', type(self).__name__)} {self._kind}"

    @classmethod
    def _param_names(cls) -> List[str]:
        # Every constructor argument is stored under its own name, so the signature is the state's schema.
        return list(inspect.signature(cls).parameters)

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's name and constructor arguments, as plain Python numbers and strings.

        Safe for `torch.save` and `torch.load(..., weights_only=True)`.
        """
        return {"name": self.name, **{p: getattr(self, p) for p in self._param_names()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take the arguments in `state_dict` (from `state_dict()` of the same kind of schedule), checking them.

        Raises:
            CheckpointError: `state_dict` belongs to another schedule or lacks / adds keys.
            ConfigError: a value is invalid (as the constructor would say).
        """
        state = dict(state_dict)
        name = state.pop("name", None)
        if name != self.name:
            raise CheckpointError(f"state_dict is for {name!r}, not for the {self._where}")
        expected = self._param_names()
        if set(state) != set(expected):
            raise CheckpointError(
                f"{self._where} state_dict has keys {sorted(state)}; expected {sorted(expected)}"
            )
        sig = inspect.signature(type(self))
        args = [state[p.name] for p in sig.parameters.values() if p.kind is p.POSITIONAL_ONLY]
        kwargs = {p.name: state[p.name] for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
        fresh = type(self)(*args, **kwargs)  # re-runs every check
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self._param_names())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.state_dict() == self.state_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable through load_state_dict
