"""A name -> class registry (methods, tasks). A new entry is one file plus one decorator."""

from __future__ import annotations

from talkingmodels.errors import UserError


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str):
        def add(cls):
            cls.name = name
            self[name] = cls
            return cls

        return add

    def get_class(self, name: str) -> type:
        if name not in self:
            raise UserError(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(sorted(self))}")
        return self[name]
