"""The exception types users see (a message that names the problem), and small helpers for messages."""

from __future__ import annotations

import numbers
import string
from collections.abc import Iterable, Mapping


class MoejaxError(Exception):
    """A problem with the user's input (file, tensor, shape, flag), reported in one line.

    The CLI prints the message and exits with status 2; the Python API raises it as is.
    """

    def render(self, names: Mapping[str, str]) -> str:
        """The message with parameters named as in `names` (see ParameterError); here, the message."""
        return str(self)


class ParameterError(MoejaxError):
    """A bad value given through named parameters of the Python API (`moejax.load`, GenerationConfig, ...).

    `template` names each parameter as a format field, `{expert_budget}`; the other fields are
    filled from `values`, so a value is never parsed as a template. `str(err)` names the Python
    parameters ("expert_budget must be positive"); `err.render(names)` names them as a front end
    does, e.g. the CLI with its flags ("--expert-budget must be positive").
    """

    def __init__(self, template: str, **values):
        self.template, self.values = template, values
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        self.parameters = tuple(dict.fromkeys(f for f in fields if f not in values))
        super().__init__(self.render({}))

    def render(self, names: Mapping[str, str]) -> str:
        return self.template.format(**{p: names.get(p, p) for p in self.parameters}, **self.values)

    @classmethod
    def not_one_of(cls, parameter: str, value, choices: Iterable[str], hint: str = "") -> ParameterError:
        """"{parameter} 'value' is not one of a, b, c" (then `hint`, plain text)."""
        return cls("{" + parameter + "} {value!r} is not one of {choices}{hint}", value=value,
                   choices=", ".join(choices), hint=hint)


def plural(count: int, noun: str) -> str:
    """'1 expert', '2 experts' (nouns whose plural adds an s)."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def is_integer(value) -> bool:
    """Whether `value` is an integer (a Python or NumPy one), and not a bool: True is no count or token id."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
